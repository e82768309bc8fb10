"""Evaluation asset, the blocking champion gate, and promotion to champion."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from srpu_pipelines.assets._metadata import image_preview, iou_table
from srpu_pipelines.pipeline.steps import CHAMPION, champion_gate, run_evaluate, run_promote
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource


def evaluation_asset(final_stage_asset: str) -> dg.AssetsDefinition:
    """The evaluation asset, downstream of the final training stage's asset."""

    @dg.asset(
        name="evaluation",
        group_name="evaluation",
        deps=[final_stage_asset],
        description="Per-class IoU and Dice of the final stage's model on the test split, "
        "overlay pictures (srpu evaluate); logged into that stage's MLflow run.",
    )
    def _evaluation(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        p = params.load()
        m = run_evaluate(p, mlflow.tracker(p), progress=False)
        meta = {
            "split": m["split"],
            "images": m["images"],
            "miou": m["miou"],
            "mdice": m["mdice"],
            "per_class": iou_table(m),
            "metrics": dg.MetadataValue.path(str(Path(p.evaluate.out_dir) / "metrics.json")),
        }
        if m["overlay_files"]:
            meta["overlay"] = image_preview(m["overlay_files"][0])
        return dg.MaterializeResult(metadata=meta)

    return _evaluation


@dg.asset_check(
    asset="evaluation",
    blocking=True,
    description="The new model's validation mIoU is not below the champion's.",
)
def not_worse_than_champion(params: ParamsResource, mlflow: MlflowResource) -> dg.AssetCheckResult:
    p = params.load()
    tracker = mlflow.tracker(p)
    if tracker is None:
        return dg.AssetCheckResult(
            passed=False,
            description="tracking.enabled is false: there is no registry to promote in",
        )
    g = champion_gate(p, tracker)
    return dg.AssetCheckResult(
        passed=g["passed"],
        metadata={k: v for k, v in g.items() if v is not None and k != "passed"},
        description=g["reason"] or None,
    )


@dg.asset(
    group_name="evaluation",
    deps=["evaluation"],
    description="Alias 'champion' on the new model version when it is not worse than the "
    "champion. In srpu_pipeline it runs only when the blocking gate passed; in an "
    "active-learning round it applies the gate itself and keeps the champion otherwise.",
)
def champion_model(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    p = params.load()
    tracker = mlflow.tracker(p)
    if tracker is None:
        raise dg.Failure("tracking.enabled is false: no registry to promote in")
    # run_promote applies the gate (again, where the blocking check ran) and writes the
    # decision where `srpu promote` (DVC) writes it
    g = run_promote(p, tracker)
    mv = tracker.get_alias(CHAMPION)
    chain = ""
    if mv is not None:
        from srpu_pipelines.pipeline.lineage import format_lineage, lineage

        chain = format_lineage(lineage(tracker, f"models:/{tracker.registered_model}@champion"))
    return dg.MaterializeResult(
        metadata={
            "lineage": dg.MetadataValue.md(f"```\n{chain}\n```" if chain else "no champion"),
            "registered_model": tracker.registered_model,
            "version": mv.version if mv else None,
            "promoted": g["passed"],
            "gate": g["reason"] or ("passed" if g["passed"] else "not better than the champion"),
            "val_miou": mv.val_miou if mv else None,
            "uri": f"models:/{tracker.registered_model}@champion",
        }
    )
