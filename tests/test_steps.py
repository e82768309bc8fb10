"""Pipeline steps with the in-memory tracker: idempotent re-runs, restarts, the gate."""

import pytest

from srpu_pipelines.pipeline.steps import (
    CHAMPION,
    champion_gate,
    final_dir,
    run_evaluate,
    run_index,
    run_promote,
    run_train,
)
from srpu_pipelines.resources.tracking import RecordingTracker


@pytest.fixture
def ready(demo_params):
    run_index(demo_params, progress=False)
    return demo_params, RecordingTracker()


def test_rerun_with_nothing_changed_registers_nothing_new(ready):
    params, t = ready
    first = run_train(params, t, progress=False)
    again = run_train(params, t, progress=False)
    assert len(t.versions) == 1 and len(t.runs) == 1
    assert again["version"].version == first["version"].version
    assert not again["result"].trained


def test_changed_settings_start_over_and_register_a_new_version(ready):
    params, t = ready
    run_train(params, t, progress=False)
    other = params.model_copy(deep=True)
    other.train.lr = 0.01
    out = run_train(other, t, progress=False)
    assert out["result"].trained and out["version"].version == "2"


def test_gate_promotes_first_then_compares_on_the_same_validation_images(ready):
    params, t = ready
    run_train(params, t, progress=False)
    assert run_promote(params, t)["passed"] and t.aliases[CHAMPION] == "1"
    # a champion scored on other data is re-scored on this validation split
    t.versions[0].tags["data_revision"] = "other"
    other = params.model_copy(deep=True)
    other.train.lr = 0.01
    run_train(other, t, progress=False)
    g = champion_gate(other, t)
    assert g["reason"] == "champion re-scored on the current validation split"
    assert isinstance(g["champion_val_miou"], float)


def test_gate_refuses_a_model_without_validation_score(ready):
    params, t = ready
    run_train(params, t, progress=False)
    run_promote(params, t)
    p = params.model_copy(deep=True)
    p.train.val_split = "nothing"
    run_train(p, t, progress=False)
    g = champion_gate(p, t)
    assert not g["passed"] and "no validation score" in g["reason"]


def test_evaluate_logs_only_the_registered_checkpoint(ready):
    params, t = ready
    run_train(params, t, progress=False)
    run_evaluate(params, t, progress=False)
    logged = len(t.runs["run0"]["metrics"])
    out = final_dir(params)
    run_evaluate(params, t, checkpoint=out / "last.pt", progress=False)
    best_is_last = (out / "best.pt").read_bytes() == (out / "last.pt").read_bytes()
    assert len(t.runs["run0"]["metrics"]) == logged + (1 if best_is_last else 0)


def test_rerun_of_a_time_budgeted_run_registers_nothing_new(ready):
    params, t = ready
    params = params.model_copy(deep=True)
    params.train.budget_s, params.train.max_steps = 0.01, 10**6
    run_train(params, t, progress=False)
    again = run_train(params, t, progress=False)
    assert len(t.versions) == 1 and not again["result"].trained
