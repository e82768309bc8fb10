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
tick's message and never start a run by themselves. The cursor holds the last run key
requested.

A round that fails is asked for again: masks a round indexed but did not record in the
history (it failed after ``dataset_index``) still count as pending, and a failed round is
re-requested up to ``active.round_retries`` times, each retry under a new run key
(``<key>-retry<N>``: Dagster starts nothing for a key it has seen), the attempt in the
tick's message and the run's tags. After the last retry the tick says so and waits for a
person (fix the cause, then launch the job from the UI); the masks stay pending.
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
        *(
            f"uncertainty_scores_{d.name}"
            for d in params.data.datasets
            if params.active.scoring_fanout == "per_dataset"
        ),
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


FAILED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED)
KEY_TAG = "srpu/masks_key"  # the pending masks' key, the same on every retry
ATTEMPT_TAG = "srpu/attempt"


def pending_pairs(
    params: Params, index: dict[str, Any], history: list[dict[str, Any]]
) -> tuple[list[Any], list[Any], list[dict], list[Any]]:
    """(new pairs on disk, changed indexed pairs, indexed items no round recorded yet,
    problems). The third are the corrections of a round that failed after indexing them:
    without them its masks would no longer be "new" and wait silently for more."""
    from srpu_pipelines.active_learning.rounds import new_labels

    new, changed, problems = new_labels(params, index)
    unrecorded: list[dict] = []
    if history:  # before the first entry the pipeline has not run once: nothing pending
        recorded = set(history[-1].get("labeled_ids", []))
        unrecorded = [it for it in index["items"] if it["id"] not in recorded]
    return new, changed, unrecorded, problems


def check_new_masks(
    params: Params,
    cursor: str | None,
    round_running: bool,
    past_runs: Any = None,
) -> tuple[dg.RunRequest | None, str, str]:
    """(run request or None, new cursor, message) for one tick. ``past_runs(key)`` gives
    the statuses (oldest first) of the round runs already made for the pending masks'
    key (the sensor asks the Dagster instance; without it none are known)."""
    from srpu_pipelines.active_learning.history import read_history, stop_reason
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.io.files import sha256_file

    cursor = cursor or ""
    if not params.data.index_path.is_file():
        return None, cursor, "no dataset index yet: materialize the pipeline once first"
    history = read_history(params)
    index = load_index(params.data.index_path)
    new, changed, unrecorded, problems = pending_pairs(params, index, history)
    pairs = new + changed
    reported = "".join(f"\n  not usable: {p}" for p in problems[:20])
    if len(problems) > 20:
        reported += f"\n  ... and {len(problems) - 20} more"
    reported += "".join(f"\n  changed since indexed: {p.mask}" for p in changed)
    if unrecorded:
        reported += (
            f"\n  {len(unrecorded)} indexed mask(s) no round recorded yet (a round failed "
            "after indexing them): they count as new"
        )
    n, need = len(pairs) + len(unrecorded), params.active.min_new_masks
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
    stop = stop_reason(params, history)
    if stop:
        return None, cursor, f"active learning has stopped: {stop}{reported}"
    h = hashlib.sha256()
    for pid, sha in sorted(
        [(p.id, sha256_file(p.mask)) for p in pairs]
        + [(it["id"], it["mask_sha256"]) for it in unrecorded]
    ):
        h.update(f"{pid}\0{sha}\n".encode())
    key = f"new-masks-{h.hexdigest()[:20]}"
    statuses = list(past_runs(key)) if past_runs is not None else []
    failures = sum(1 for st in statuses if st in FAILED)
    retries = params.active.round_retries
    if round_running:
        return None, cursor, f"{n} new masks wait: a round is running{reported}"
    if statuses and statuses[-1] not in FAILED:
        return (
            None,
            cursor,
            f"a round for these {n} masks was requested ({statuses[-1].value}){reported}",
        )
    if failures > retries:
        return (
            None,
            cursor,
            (
                f"the round for these {n} masks failed {failures} time(s) (active.round_retries: "
                f"{retries}): fix the cause, then launch {ROUND_JOB} from the UI; the masks "
                f"stay pending{reported}"
            ),
        )
    run_key = key if failures == 0 else f"{key}-retry{failures}"
    if run_key == cursor and not statuses:
        return (
            None,
            cursor,
            f"a round was already requested for these {n} masks{reported}",
        )
    tags: dict[str, Any] = {
        "srpu/new_masks": str(n),
        KEY_TAG: key,
        ATTEMPT_TAG: str(failures + 1),
    }
    what = (
        f"{n} new masks: round requested"
        if failures == 0
        else f"{n} new masks: retry {failures} of {retries} requested (the last round for "
        "them failed)"
    )
    return dg.RunRequest(run_key=run_key, tags=tags), run_key, f"{what}{reported}"


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

    def past_runs(key: str) -> list[dg.DagsterRunStatus]:
        runs = context.instance.get_runs(
            filters=dg.RunsFilter(job_name=ROUND_JOB, tags={KEY_TAG: key})
        )
        return [r.status for r in reversed(runs)]  # get_runs gives the newest first

    request, cursor, message = check_new_masks(p, context.cursor, running, past_runs)
    context.update_cursor(cursor)
    if request is None:
        return dg.SkipReason(message)
    context.log.info(message)
    return request
