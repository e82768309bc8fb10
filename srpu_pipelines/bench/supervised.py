"""``srpu bench supervised``: training from scratch per data set and seed under a budget,
test scores, side by side with the peer loop on the same images and budget.

Each (set, loop, seed) run writes its result to ``WORK/<set>/<loop>/seed<k>.json`` once it
has finished; a rerun of the command skips what is there (a run interrupted midway starts
that run over), so a two-hour table survives an interruption.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.bench.common import drop_weights, peer_layout, run_peer, run_setup, spread
from srpu_pipelines.config import Params
from srpu_pipelines.data.index import build_index
from srpu_pipelines.errors import InputError, MissingError
from srpu_pipelines.io.files import atomic_write_json, read_json
from srpu_pipelines.training.trainer import train_stage


def _srpu_run(
    p: Params, index: dict, seed: int, budget_s, steps, out: Path, progress: bool, keep: bool
) -> dict[str, Any]:
    p = p.model_copy(deep=True)
    p.seed = seed
    if out.exists():
        shutil.rmtree(out)  # a benchmark run always starts from scratch
    res = train_stage(run_setup(p, out, budget_s, steps), index, progress=progress)
    m = evaluate_checkpoint(p, index, res.best_checkpoint, out_dir=out / "eval", progress=progress)
    # splits nobody trains or selects on (e.g. other alloys: a domain-shift test)
    used = {*p.train.splits, p.train.val_split, p.evaluate.split}
    extra = {}
    for split in sorted({it["split"] for it in index["items"]} - used):
        e = evaluate_checkpoint(
            p, index, res.best_checkpoint, split, out / f"eval_{split}", progress=progress
        )
        extra[split] = {"miou": round(e["miou"], 4), "per_class_iou": _r(e["iou"])}
    drop_weights(out, keep="best.pt" if keep else None)
    plan = res.info.get("plan")
    return {
        "seed": seed,
        "steps": res.steps,
        "train_s": round(res.train_seconds, 1),
        "best_epoch": res.best_epoch,
        "val_miou": round(res.best_miou, 4),
        "per_class_iou": _r(m["iou"]),
        "miou": round(m["miou"], 4),
        "other_splits": extra,
        "plan": plan["values"] if plan else None,
    }


def _r(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) for k, v in d.items()}


def _peer_run(
    p: Params, index: dict, seed: int, budget_s, steps, work: Path, script: Path
) -> dict[str, Any]:
    data = peer_layout(p, index, work / "peer_data", p.train.splits, [p.evaluate.split])
    r = run_peer(script, data, p.num_classes, seed, steps=steps, budget_s=budget_s)
    return {
        "seed": seed,
        "steps": r["steps"],
        "train_s": r["train_s"],
        "per_class_iou": dict(zip(p.class_names, r["per_class_iou"], strict=True)),
        "miou": r["miou"],
    }


def _summary(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    out = {
        "runs": runs,
        "miou": spread([r["miou"] for r in runs]),
        "per_class_iou": {n: spread([r["per_class_iou"][n] for r in runs]) for n in names},
        "steps": spread([r["steps"] for r in runs]),
    }
    for split in runs[0].get("other_splits", {}):
        out[f"{split}_miou"] = spread([r["other_splits"][split]["miou"] for r in runs])
    return out


def bench_set(
    name: str,
    params: Params,
    *,
    seeds: int,
    budget_s: float | None,
    steps: int | None,
    work_dir: Path,
    peer_script: Path | None = None,
    progress: bool = True,
    keep_weights: bool = False,
) -> dict[str, Any]:
    """One data set: SRPU (and the peer) per seed; finished runs are read back."""
    index = build_index(params, show_progress=False)
    loops = ["srpu"] + (["peer"] if peer_script else [])
    out: dict[str, Any] = {"test_split": params.evaluate.split}
    for loop in loops:
        runs = []
        for seed in range(seeds):
            done = work_dir / name / loop / f"seed{seed}.json"
            if done.is_file():
                runs.append(read_json(done))
                continue
            if loop == "srpu":
                run_dir = work_dir / name / "srpu" / f"seed{seed}"
                r = _srpu_run(params, index, seed, budget_s, steps, run_dir, progress, keep_weights)
            else:
                r = _peer_run(params, index, seed, budget_s, steps, work_dir / name, peer_script)
            atomic_write_json(done, r)
            runs.append(r)
        out[loop] = _summary(runs, params.class_names)
    if "peer" in out:
        out["srpu_minus_peer_miou"] = round(
            out["srpu"]["miou"]["mean"] - out["peer"]["miou"]["mean"], 4
        )
    return out


def bench_supervised(
    sets: dict[str, Params],
    seeds: int,
    budget_s: float | None,
    steps: int | None,
    work_dir: Path,
    peer_script: Path | None = None,
    progress: bool = True,
    keep_weights: bool = False,
) -> dict[str, Any]:
    """Train from scratch on ``train.splits`` per set and seed under the budget (a time
    budget, a step budget, or both: whichever ends first); score ``evaluate.split``.

    Training time includes the validations that pick the best checkpoint; the final test
    scoring is outside the budget. With ``peer_script``, the peer loop trains on the same
    train images (decoded by SRPU) under the same budget and is scored on the same test
    images, one run after the other, never side by side in time (they would share the
    cores)."""
    if peer_script is not None and not peer_script.is_file():
        raise MissingError(f"bench supervised: peer script {peer_script} not found")
    if peer_script is not None and budget_s and steps:
        raise InputError(
            "bench supervised --peer: give --budget-s or --steps, not both (the peer loop "
            "takes one budget)"
        )
    return {
        "bench": "supervised",
        "budget_s": budget_s,
        "step_budget": steps,
        "seeds": seeds,
        "sets": {
            name: {
                "model": p.model.model_dump(mode="json"),
                **bench_set(
                    name,
                    p,
                    seeds=seeds,
                    budget_s=budget_s,
                    steps=steps,
                    work_dir=work_dir,
                    peer_script=peer_script,
                    progress=progress,
                    keep_weights=keep_weights,
                ),
            }
            for name, p in sets.items()
        },
    }
