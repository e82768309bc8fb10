"""Pool scoring fanned out per sub-dataset (opt-in): two parts, each its own asset, run
by the multiprocess executor in two processes with one torch thread each."""

from __future__ import annotations

import dagster as dg
import yaml

from srpu_pipelines.config import parse_params
from tests.conftest import tiny_params_dict


def pipeline_job():
    """The job as the code location builds it from $SRPU_PARAMS (here and in each step's
    process), for reconstruction."""
    from srpu_pipelines.config import load_params
    from srpu_pipelines.definitions import build_definitions
    from srpu_pipelines.resources.dagster_resources import params_path

    return build_definitions(load_params(params_path())).resolve_job_def("srpu_pipeline")


def test_scoring_parts_run_in_parallel_processes_and_resume(tmp_path, monkeypatch):
    from srpu_pipelines.active_learning.scoring import scores_dir
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.definitions import build_definitions
    from srpu_pipelines.pipeline.steps import run_index

    d = tiny_params_dict(
        tmp_path,
        **{
            "active.scoring_fanout": "per_dataset",
            "active.scoring_threads": 1,
            "orchestration.executor": "multiprocess",
        },
    )
    pf = tmp_path / "params.yaml"
    pf.write_text(yaml.safe_dump(d))
    p = parse_params(d)
    generate_demo(p)
    run_index(p, progress=False)
    defs = build_definitions(p)
    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"uncertainty_scores_a", "uncertainty_scores_b", "uncertainty_scores"} <= keys
    monkeypatch.setenv("SRPU_PARAMS", str(pf))
    monkeypatch.chdir(tmp_path)
    selection = [dg.AssetKey(k) for k in ("uncertainty_scores_a", "uncertainty_scores_b")]
    with dg.instance_for_test() as instance:
        result = dg.execute_job(
            dg.reconstructable(pipeline_job), instance, asset_selection=selection
        )
        assert result.success
        starts = {
            e.step_key: e.pid for e in result.all_events if e.event_type_value == "STEP_START"
        }
    assert set(starts) == {"uncertainty_scores_a", "uncertainty_scores_b"}
    assert len(set(starts.values())) == 2  # a process each
    for part in ("a", "b"):
        summary = yaml.safe_load((scores_dir(p) / f"summary-{part}.json").read_text())
        assert {r["id"].split("/", 1)[0] for r in summary["images"]} == {part}
    # the whole asset then finds every record fresh: nothing computed again
    from srpu_pipelines.pipeline.active import run_score

    again = run_score(p, None, progress=False)
    assert again["computed"] == 0 and again["kept"] > 0
