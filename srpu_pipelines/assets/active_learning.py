"""Active-learning assets: the pool's uncertainty scores (stored per image and model
version) and the batch a person labels next (a round folder)."""

from __future__ import annotations

from typing import Any

import dagster as dg

from srpu_pipelines.assets._metadata import png_md
from srpu_pipelines.pipeline.active import run_record_round, run_score, run_select
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource


def _scores_metadata(p, res: dict[str, Any]) -> dict[str, Any]:
    agg = p.active.aggregation
    strategies = list(p.active.strategies)
    rows = [f"| image | {' | '.join(strategies)} |", "| --- |" + " ---: |" * len(strategies)]
    ranked = sorted(
        res["images"], key=lambda r: -(r["scores"].get(strategies[0], {}).get(agg, 0.0))
    )
    for r in ranked[:25]:
        vals = [r["scores"].get(s, {}).get(agg) for s in strategies]
        rows.append(
            f"| {r['id']} | " + " | ".join("-" if v is None else f"{v:.3f}" for v in vals) + " |"
        )
    return {
        "model_key": res["model_key"],
        "pool_images": len(res["images"]),
        "computed": res["computed"],
        "kept": res["kept"],
        "failed": len(res["failed"]),
        f"scores ({agg}, top 25 by {strategies[0]})": dg.MetadataValue.md("\n".join(rows)),
    }


def _part_asset(name: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"uncertainty_scores_{name}",
        group_name="active_learning",
        deps=["dataset_index", "champion_model"],
        description=f"Pool scoring of sub-dataset {name!r} (active.scoring_fanout: "
        "per_dataset): resumable, and run in parallel with the others by a multiprocess "
        "executor.",
    )
    def _part(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        p = params.load()
        return dg.MaterializeResult(
            metadata=_scores_metadata(p, run_score(p, mlflow.tracker(p), False, {name}))
        )

    return _part


def scoring_assets(params) -> list[dg.AssetsDefinition]:
    """``uncertainty_scores``; with ``active.scoring_fanout: per_dataset`` also one asset
    per sub-dataset before it (it then finds every record fresh and writes the summary)."""
    parts = (
        [_part_asset(d.name) for d in params.data.datasets]
        if params.active.scoring_fanout == "per_dataset"
        else []
    )

    @dg.asset(
        name="uncertainty_scores",
        group_name="active_learning",
        deps=["dataset_index", "champion_model", *(a.key for a in parts)],
        description="Uncertainty of every pool image and tile under the champion (srpu "
        "score); only scores made by another model, or of changed images, are recomputed.",
    )
    def uncertainty_scores(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
        p = params.load()
        return dg.MaterializeResult(
            metadata=_scores_metadata(p, run_score(p, mlflow.tracker(p), progress=False))
        )

    return [*parts, uncertainty_scores]


def batch_table(summary: dict[str, Any]) -> str:
    """Markdown: rank | item | score | image | predicted mask | uncertainty, per selection."""
    rows = [
        "| rank | item | combined score | image | predicted mask | uncertainty |",
        "| ---: | --- | ---: | --- | --- | --- |",
    ]
    for s in summary["selected"]:
        pics = [
            png_md(s[k], 160) if s.get(k) else "-"
            for k in ("image_file", "mask_file", "uncertainty_file")
        ]
        rows.append(
            f"| {s['rank']} | {s['id']} | {s['combined_score']:.3f} | " + " | ".join(pics) + " |"
        )
    return "\n".join(rows)


def selection_table(summary: dict[str, Any]) -> dg.MetadataValue:
    """The batch as a table the UI shows inline: rank, item, scores, the mask to correct."""
    strategies = sorted(summary["selected"][0]["scores"]) if summary["selected"] else []
    cols = [
        dg.TableColumn("rank", "int"),
        dg.TableColumn("item", "string"),
        dg.TableColumn("combined score", "float"),
        *[dg.TableColumn(s, "float") for s in strategies],
        dg.TableColumn("mask to correct", "string"),
    ]
    rows = [
        dg.TableRecord(
            {
                "rank": s["rank"],
                "item": s["id"],
                "combined score": s["combined_score"],
                **{k: s["scores"][k] for k in strategies},
                "mask to correct": s.get("mask_file", "(paint from scratch)"),
            }
        )
        for s in summary["selected"]
    ]
    return dg.MetadataValue.table(rows, dg.TableSchema(cols))


@dg.asset(
    group_name="active_learning",
    deps=["uncertainty_scores"],
    description="The next items to label (srpu select): a round folder with each image, its "
    "predicted colour mask to correct and an uncertainty heat map.",
)
def selected_batch(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    p = params.load()
    res = run_select(p, mlflow.tracker(p))
    s = res["summary"]
    return dg.MaterializeResult(
        metadata={
            "round": res["round"],
            "folder": dg.MetadataValue.path(str(res["folder"])),
            "new_round": res["new"],
            "model_key": s["model_key"],
            "cold_start": s["cold_start"],
            "items": len(s["selected"]),
            "selection": selection_table(s),
            "batch": dg.MetadataValue.md(batch_table(s)),
            "how_to": s["how_to"],
        }
    )


@dg.asset(
    group_name="active_learning",
    deps=["selected_batch"],
    description="One line per finished round in active.out_dir/history.jsonl and an MLflow "
    "run: labels that came back, correction effort, val mIoU before and after, next batch.",
)
def round_history(params: ParamsResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    from srpu_pipelines.active_learning.history import history_path, read_history
    from srpu_pipelines.active_learning.rounds import round_folders

    p = params.load()
    latest = round_folders(p)[-1][0]
    res = run_record_round(p, mlflow.tracker(p), latest)
    rows = [
        "| round | labelled | corrected | correction Dice | val mIoU before | after | test mIoU |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.4f}"

    for h in read_history(p):
        rows.append(
            f"| {h['round']} | {h['labeled_count']} | {len(h['corrected'])} | "
            f"{f(h['mean_correction_dice'])} | {f(h['val_miou_before'])} | "
            f"{f(h['val_miou_after'])} | {f(h['test_miou'])} |"
        )
    return dg.MaterializeResult(
        metadata={
            "round": res["entry"]["round"],
            "new_entry": res["new"],
            "stopped": res["stop"] or "no",
            "history": dg.MetadataValue.md("\n".join(rows)),
            "path": dg.MetadataValue.path(str(history_path(p))),
        }
    )
