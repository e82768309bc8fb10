"""MLflow on a temporary SQLite store: runs, registry, aliases, and the pyfunc model."""

import numpy as np
import pytest

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
