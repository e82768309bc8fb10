"""MLflow on a temporary SQLite store: runs, registry, aliases, and the pyfunc model."""

import time

import numpy as np
import pytest
import yaml

from srpu_pipelines.analysis.inference import predict_labels
from srpu_pipelines.config import TrackingParams, parse_params
from srpu_pipelines.data.dataset import standardize
from srpu_pipelines.models.checkpoint import load_model
from srpu_pipelines.pipeline.steps import run_index, run_promote, run_train
from tests.conftest import tiny_params_dict


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.resources.tracking import MlflowTracker

    tmp = tmp_path_factory.mktemp("mlflow")
    d = tiny_params_dict(tmp)
    d["tracking"]["enabled"] = True
    params = parse_params(d)
    generate_demo(params)
    run_index(params, progress=False)
    tracker = MlflowTracker(params.tracking)
    out = run_train(params, tracker, progress=False)
    return params, tracker, out


def test_uri_defaults_to_sqlite_and_env_overrides(tmp_path, monkeypatch):
    from srpu_pipelines.resources.tracking import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = TrackingParams(default_db=tmp_path / "db/m.db", artifact_root=tmp_path / "art")
    t = MlflowTracker(p)
    assert t.uri == f"sqlite:///{(tmp_path / 'db/m.db').as_posix()}"
    # MLflow exports the URI it is given; a second tracker must not mistake it for the user's
    other = TrackingParams(default_db=tmp_path / "db/other.db", artifact_root=tmp_path / "art")
    assert MlflowTracker(other).uri.endswith("db/other.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert MlflowTracker(p).uri.endswith("env.db")


def test_run_registered_and_promoted(tracked):
    params, tracker, out = tracked
    mv = out["version"]
    assert mv.version == "1" and tracker.get_alias("challenger").version == "1"
    run = tracker.client.get_run(mv.run_id)
    assert run.data.params["train.epochs"] == "2"
    assert run.data.tags["srpu.data_revision"] == out["record"]["data_revision"]
    hist = tracker.client.get_metric_history(mv.run_id, "val_miou")
    assert [m.step for m in hist] == [1, 2]
    gate = run_promote(params, tracker)
    assert gate["passed"] and tracker.get_alias("champion").version == "1"


def test_champion_loads_from_registry_and_predicts_like_the_checkpoint(tracked):
    import mlflow

    params, tracker, out = tracked
    run_promote(params, tracker)
    model = mlflow.pyfunc.load_model(f"models:/{tracker.registered_model}@champion")
    img = np.random.default_rng(0).random((70, 90)).astype(np.float32)  # any size
    got = model.predict(img[None], params={"tile_size": 64})
    net, _ = load_model(out["result"].best_checkpoint)
    want = predict_labels(net, standardize(img), tile=64, overlap=0.25, batch_size=8)
    assert got.shape == (1, 70, 90) and np.array_equal(got[0], want)
    ckpt = tracker.fetch_checkpoint("champion", params.predict.models_cache)
    assert ckpt.is_file() and ckpt.suffix == ".pt"


def test_only_not_found_means_no_champion():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import (
        INTERNAL_ERROR,
        INVALID_PARAMETER_VALUE,
        RESOURCE_DOES_NOT_EXIST,
    )

    from srpu_pipelines.resources.tracking import is_not_found

    missing_model = MlflowException(
        "Registered Model with name=x not found", RESOURCE_DOES_NOT_EXIST
    )
    missing_alias = MlflowException(
        "Registered model alias champion not found.", INVALID_PARAMETER_VALUE
    )
    locked = MlflowException("(sqlite3.OperationalError) database is locked", INTERNAL_ERROR)
    bad_name = MlflowException("Invalid model name ''", INVALID_PARAMETER_VALUE)
    assert is_not_found(missing_model) and is_not_found(missing_alias)
    assert not is_not_found(locked) and not is_not_found(bad_name)


def test_a_registry_fault_stops_the_promotion_and_keeps_the_champion(tracked, monkeypatch):
    """A registry hiccup once read as "no champion": the gate passed as "first champion"
    and the alias went to a model that was never compared."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR

    from srpu_pipelines.errors import RegistryError, UserError

    params, tracker, _ = tracked
    assert tracker.get_alias("no-such-alias") is None  # not found: nothing there
    run_promote(params, tracker)
    champion = tracker.get_alias("champion").version
    real = tracker.client.get_model_version_by_alias

    def locked(name, alias):
        raise MlflowException("(sqlite3.OperationalError) database is locked", INTERNAL_ERROR)

    monkeypatch.setattr(tracker.client, "get_model_version_by_alias", locked)
    with pytest.raises(RegistryError, match=r"srpu-segmenter@champion failed .*database is locked"):
        run_promote(params, tracker)
    with pytest.raises(UserError):
        tracker.get_alias("champion")
    monkeypatch.setattr(tracker.client, "get_model_version_by_alias", real)
    assert tracker.get_alias("champion").version == champion


def test_a_person_rolls_the_champion_back_and_the_history_says_so(tmp_path):
    from srpu_pipelines.active_learning.history import append_history, read_history
    from srpu_pipelines.errors import NotFoundError
    from srpu_pipelines.pipeline.steps import run_rollback
    from srpu_pipelines.resources.tracking import RecordingTracker

    p = parse_params(tiny_params_dict(tmp_path))
    t = RecordingTracker()
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"weights")
    for _ in range(2):
        with t.start_run("train", {}, {}):
            t.log_model(ckpt, {})
    t.set_alias("champion", "2")
    append_history(
        p, {"round": 1, "labeled_ids": ["a/x"], "labeled_revision": "r", "corrected": []}
    )
    entry = run_rollback(p, t, "1", reason="v2 smears the cracks")
    assert t.get_alias("champion").version == "1"
    h = read_history(p)[-1]
    assert h == entry and h["round"] == 2 and h["event"] == "rollback"
    assert (h["champion_before"], h["champion_after"]) == ("2", "1")
    assert h["labeled_ids"] == ["a/x"] and h["reason"] == "v2 smears the cracks"
    with pytest.raises(NotFoundError, match="has no version 7"):
        run_rollback(p, t, "7")
    assert t.get_alias("champion").version == "1" and len(read_history(p)) == 2


def test_a_registered_version_traces_back_to_data_rounds_params_and_commit(
    tracked, capsys, tmp_path
):
    import re

    from srpu_pipelines.cli import main
    from srpu_pipelines.pipeline.lineage import format_lineage, lineage

    params, tracker, out = tracked
    d = lineage(tracker, f"models:/{tracker.registered_model}/{out['version'].version}")
    assert d["index"] == out["record"]["data_revision"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", d["git_commit"]), d["git_commit"]
    assert re.fullmatch(r"[0-9a-f]{16}", d["params"])
    assert d["rounds"] == {}  # no round yet: trained on the labels it started with
    assert all(v is None for v in d["data_md5"].values())  # the test's folders: not in DVC
    text = format_lineage(d)
    for link in ("-> data: index", "-> rounds: none", "-> params:", "-> commit:"):
        assert link in text
    with pytest.raises(Exception, match="no such version"):
        lineage(tracker, f"models:/{tracker.registered_model}/99")
    run_promote(params, tracker)
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(params.resolved()))
    assert main(["-q", "--params", str(pf), "lineage"]) == 0  # the champion by default
    printed = capsys.readouterr().out
    assert printed.startswith(f"models:/{tracker.registered_model}@champion -> version ")
    assert d["git_commit"] in printed and d["index"] in printed


def test_old_runs_checkpoints_are_pruned_and_registered_ones_kept(tmp_path, monkeypatch):
    """tracking.keep_run_checkpoints: per stage, the newest N runs keep their checkpoint
    artifacts, older ones lose them, and a run with a registered version never does."""
    from srpu_pipelines.resources.tracking import MlflowTracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    p = TrackingParams(default_db=tmp_path / "m.db", artifact_root=tmp_path / "art")
    t = MlflowTracker(p, root=tmp_path)
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"weights")
    ids = []
    for _ in range(4):
        with t.start_run("train_x", {}, {"srpu.stage": "x"}) as rid:
            t.log_artifact(ckpt, "checkpoint")
            ids.append(rid)
        time.sleep(0.02)  # distinct start times
    with t.start_run("train_y", {}, {"srpu.stage": "y"}):
        t.log_artifact(ckpt, "checkpoint")
    t.client.create_registered_model(t.registered_model)
    run0 = t.client.get_run(ids[0])
    t.client.create_model_version(t.registered_model, f"{run0.info.artifact_uri}/x", ids[0])

    def has_ckpt(rid: str) -> bool:
        return bool(t.client.list_artifacts(rid, "checkpoint"))

    pruned = t.prune_checkpoints("x", keep=2)
    assert pruned == [ids[1]]  # ids[0] is registered, ids[2:] are the newest two
    assert [has_ckpt(r) for r in ids] == [True, False, True, True]
    assert t.prune_checkpoints("x", keep=2) == []  # again: nothing more to do
    assert has_ckpt(
        t.client.search_runs([t.experiment_id], "tags.`srpu.stage` = 'y'")[0].info.run_id
    )
