"""The sensor that starts an active-learning round when corrected masks arrive.

Each tick it lists the labelled pairs on disk that the index does not hold yet, each
validated (decodes to the params colours, same size as its image); an indexed mask that
changed counts too, and is reported. When at least ``active.min_new_masks`` valid new
pairs are there, no round is running, no file in the labelled folders would stop the
index (with ``data.on_bad_input: error``) and active learning has not stopped, it
requests one run of the round job. The run key is a hash of
the new pairs (ids and mask contents): the same files dropped again map to the same key,
and Dagster starts nothing for a key it has seen. Partial or invalid drops (a mask
without its image, a mask of the wrong size or with unknown colours) are reported in the
tick's message and never start a run by themselves. The cursor holds the last key
requested.
"""

from __future__ import annotations

import hashlib
from typing import Any

import dagster as dg

from srpu_pipelines.config import Params
from srpu_pipelines.pipeline.steps import final_stage, stage_asset_name
from srpu_pipelines.resources.dagster_resources import ParamsResource

ROUND_JOB = "active_learning_round"
IN_PROGRESS = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def round_asset_keys(params: Params) -> list[str]:
    """What a round materialises, in order."""
    return [
        "dataset_index",
        "labeled_data",
        stage_asset_name(final_stage(params)),
        "evaluation",
        "champion_model",
        "uncertainty_scores",
        "selected_batch",
        "round_history",
    ]


def round_selection(params: Params) -> dg.AssetSelection:
    """The round's assets, without the blocking not_worse_than_champion check: a round
    whose model is not better must still re-score and select (champion_model applies the
    gate itself and keeps the champion), or the loop would stop with the new labels
    indexed and no next batch. The index checks stay."""
    return dg.AssetSelection.assets(
        *round_asset_keys(params)
    ).without_checks() | dg.AssetSelection.checks_for_assets("dataset_index")


def round_run_config(params: Params) -> dict:
    """The last stage starts from the champion."""
    return {"ops": {stage_asset_name(final_stage(params)): {"config": {"warm_start": True}}}}


def round_job(params: Params) -> dg.UnresolvedAssetJobDefinition:
    return dg.define_asset_job(
        ROUND_JOB,
        selection=round_selection(params),
        config=round_run_config(params),
        description="One active-learning round: index the new labels, commit them to DVC, "
        "retrain the last stage warm from the champion, evaluate, promote if not worse "
        "(champion_model applies the gate), re-score the pool, select the next batch, "
        "record the round.",
    )


def check_new_masks(
    params: Params, cursor: str | None, round_running: bool
) -> tuple[dg.RunRequest | None, str, str]:
    """(run request or None, new cursor, message) for one tick."""
    from srpu_pipelines.active_learning.history import read_history, stop_reason
    from srpu_pipelines.active_learning.rounds import new_labels
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.io.files import sha256_file

    cursor = cursor or ""
    if not params.data.index_path.is_file():
        return None, cursor, "no dataset index yet: materialize the pipeline once first"
    new, changed, problems = new_labels(params, load_index(params.data.index_path))
    pairs = new + changed
    reported = "".join(f"\n  not usable: {p}" for p in problems[:20])
    if len(problems) > 20:
        reported += f"\n  ... and {len(problems) - 20} more"
    reported += "".join(f"\n  changed since indexed: {p.mask}" for p in changed)
    n, need = len(pairs), params.active.min_new_masks
    if problems and params.data.on_bad_input == "error":
        # the round's index step would stop on them (data.on_bad_input: error)
        return (
            None,
            cursor,
            (
                f"{n} new valid mask(s), but {len(problems)} file(s) in the labelled folders "
                f"that the index refuses: fix or remove them{reported}"
            ),
        )
    if n < need:
        return None, cursor, f"{n} new valid mask(s), a round needs {need}{reported}"
    stop = stop_reason(params, read_history(params))
    if stop:
        return None, cursor, f"active learning has stopped: {stop}{reported}"
    h = hashlib.sha256()
    for p in sorted(pairs, key=lambda p: p.id):
        h.update(f"{p.id}\0{sha256_file(p.mask)}\n".encode())
    key = f"new-masks-{h.hexdigest()[:20]}"
    if key == cursor:
        return (
            None,
            cursor,
            (
                f"a round was already requested for these {n} masks (if it failed, fix the cause "
                f"and launch {ROUND_JOB} from the UI){reported}"
            ),
        )
    if round_running:
        return None, cursor, f"{n} new masks wait: a round is running{reported}"
    tags: dict[str, Any] = {"srpu/new_masks": str(n)}
    return dg.RunRequest(run_key=key, tags=tags), key, f"{n} new masks: round requested{reported}"


@dg.sensor(
    job_name=ROUND_JOB,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts an active-learning round when at least active.min_new_masks new, "
    "valid masks are in the labelled folders and no round is running.",
)
def new_masks_sensor(context: dg.SensorEvaluationContext, params: ParamsResource):
    p = params.load()
    running = bool(
        context.instance.get_runs(
            filters=dg.RunsFilter(job_name=ROUND_JOB, statuses=IN_PROGRESS), limit=1
        )
    )
    request, cursor, message = check_new_masks(p, context.cursor, running)
    context.update_cursor(cursor)
    if request is None:
        return dg.SkipReason(message)
    context.log.info(message)
    return request
