"""The Dagster code location: loads, and materialises the whole pipeline on tiny data."""

import dagster as dg
import pytest
import yaml

from srpu_pipelines.config import parse_params
from srpu_pipelines.definitions import CHECKS, PARAMS, defs, pipeline_assets
from srpu_pipelines.pipeline.steps import CHAMPION, run_index
from srpu_pipelines.resources.dagster_resources import DvcResource, MlflowResource, ParamsResource
from srpu_pipelines.resources.dvc import RecordingDvc
from srpu_pipelines.resources.tracking import ModelVersion, RecordingTracker
from tests.conftest import tiny_params_dict

STAGES = [
    {"name": "head", "init": "mae", "train": {"encoder": "frozen", "epochs": 1}},
    {"name": "tune", "init": "previous", "train": {"semi": {"enabled": True}}},
]

FAKE = RecordingTracker()
FAKE_DVC = RecordingDvc()


class FakeMlflow(MlflowResource):
    """The real resource's interface, recording into FAKE instead of MLflow."""

    def tracker(self, params):
        return FAKE


class FakeDvcResource(DvcResource):
    def client(self):
        return FAKE_DVC


def test_definitions_load():
    dg.Definitions.validate_loadable(defs)
    job = defs.resolve_job_def("srpu_pipeline")
    keys = {k.to_user_string() for k in job.asset_layer.asset_graph.get_all_asset_keys()}
    stages = {f"train_{s.name}" for s in PARAMS.stages}
    assert {
        "dataset_index",
        "evaluation",
        "champion_model",
        "predictions",
        "microstructure",
        "uncertainty_scores",
        "selected_batch",
    } | stages <= keys
    assert ("mae_encoder" in keys) == any(s.init == "mae" for s in PARAMS.stages)


def test_stage_assets_follow_the_params_stage_list(tmp_path):
    d = tiny_params_dict(tmp_path)
    d["stages"] = STAGES
    assets = pipeline_assets(parse_params(d))
    deps = {
        k.to_user_string(): {x.to_user_string() for x in a.asset_deps[k]}
        for a in assets
        for k in a.keys
    }
    assert deps["train_head"] == {"dataset_index", "mae_encoder"}
    assert deps["train_tune"] == {"dataset_index", "train_head"}
    assert deps["evaluation"] == {"train_tune"}
    d["stages"] = [{"name": "only"}]
    keys = {k.to_user_string() for a in pipeline_assets(parse_params(d)) for k in a.keys}
    assert "mae_encoder" not in keys and "train_only" in keys


@pytest.fixture
def resources(tmp_path):
    from srpu_pipelines.config import parse_params
    from srpu_pipelines.data.demo import generate_demo

    d = tiny_params_dict(tmp_path)
    d["predict"]["source"] = "champion"
    d["stages"] = STAGES
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(d))
    generate_demo(parse_params(d))
    FAKE.__init__()
    FAKE_DVC.__init__()
    res = {
        "params": ParamsResource(path=str(pf)),
        "mlflow": FakeMlflow(),
        "dvc": FakeDvcResource(),
    }
    return res, tmp_path, pipeline_assets(parse_params(d))


def _metadata(result, key):
    mats = result.asset_materializations_for_node(key)
    return mats[-1].metadata


def test_materialize_everything(resources):
    res, tmp, assets = resources
    result = dg.materialize([*assets, *CHECKS], resources=res)
    assert result.success
    idx = _metadata(result, "dataset_index")
    assert idx["labelled"].value == 8 and "preview" in idx and "splits" in idx
    mae = _metadata(result, "mae_encoder")
    assert "reconstructions" in mae and mae["method"].value == "cnn"
    head = _metadata(result, "train_head")
    assert head["init"].value == "mae" and "model_version" not in head
    tm = _metadata(result, "train_tune")
    assert tm["model_version"].value == "1" and "curve" in tm and "confident_share" in tm
    ev = _metadata(result, "evaluation")
    assert "| carbon |" in ev["per_class"].value and "overlay" in ev
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["masks_decode_and_fit"] and checks["not_worse_than_champion"]
    assert FAKE.aliases == {"challenger": "1", CHAMPION: "1"}
    assert len(list((tmp / "out/pred").glob("*_pred.png"))) == 1
    scores = _metadata(result, "uncertainty_scores")
    assert scores["computed"].value == 12  # 4 pool + 8 labelled (their embeddings)
    assert scores["model_key"].value.startswith("srpu-test/v1:")
    batch = _metadata(result, "selected_batch")
    assert batch["round"].value == 1 and batch["items"].value == 2
    assert batch["batch"].value.count("data:image/png") == 6  # image, mask, heat map each
    names = [r["name"] for r in FAKE.runs.values()]
    # one MLflow run each, and the first line of the active-learning history
    assert sorted(names) == sorted(
        ["mae_encoder", "train_head", "train_tune", "quantify", "active_learning_round_1"]
    )
    micro = _metadata(result, "microstructure")
    assert micro["source"].value == "labels" and "| carbon |" in micro["quantities"].value
    run = FAKE.runs[FAKE.versions[0].run_id]
    assert run["params"]["train"]["epochs"] == 2 and run["tags"]["srpu.data_revision"]
    assert run["params"]["train"]["semi"]["enabled"] and run["tags"]["srpu.stage"] == "tune"
    assert any("val_miou" in m for _, m in run["metrics"])  # per epoch

    # progress while the stage trained: one observation per epoch (loss, val mIoU,
    # steps/s, ETA), logged before the stage's materialisation
    obs = [
        e.event_specific_data.asset_observation
        for e in result.all_events
        if e.event_type_value == "ASSET_OBSERVATION"
        and e.event_specific_data.asset_observation.asset_key.to_user_string() == "train_tune"
    ]
    assert [o.metadata["epoch"].value for o in obs] == [1, 2]
    assert {"loss", "val_miou", "steps_per_s", "eta_s"} <= set(obs[-1].metadata)
    assert obs[-1].metadata["eta_s"].value == 0.0
    kinds = [e.event_type_value for e in result.all_events if e.step_key == "train_tune"]
    assert kinds.index("ASSET_OBSERVATION") < kinds.index("ASSET_MATERIALIZATION")
    champion = _metadata(result, "champion_model")
    assert "-> commit:" in champion["lineage"].value and "-> rounds:" in champion["lineage"].value
    assert any(k.startswith("eval_test_iou.") for _, m in run["metrics"] for k in m)


def test_blocking_gate_keeps_a_better_champion(resources):
    res, _, assets = resources
    params = res["params"].load()
    rev = run_index(params, progress=False)["revision"]
    # an unbeatable champion, scored on the same validation images
    FAKE.versions.append(ModelVersion("7", "old", {"val_miou": "2.0", "data_revision": rev}))
    FAKE.aliases[CHAMPION] = "7"
    result = dg.materialize([*assets, *CHECKS], resources=res, raise_on_error=False)
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["not_worse_than_champion"] is False
    assert FAKE.aliases[CHAMPION] == "7"  # not promoted
    assert not result.asset_materializations_for_node("champion_model")


def test_assets_and_checks_invoked_directly(resources):
    """Dagster's direct invocation: an asset body and a check called like functions."""
    from srpu_pipelines.assets.data import dataset_index, masks_decode_and_fit

    res, _, _ = resources
    out = dataset_index(params=res["params"])
    assert out.metadata["labelled"] == 8
    check = masks_decode_and_fit(params=res["params"])
    assert check.passed and check.metadata["decode"].value == 0
