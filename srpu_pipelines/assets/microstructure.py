"""Microstructure asset: what a materials scientist reports, measured on the masks."""

from pathlib import Path

import dagster as dg

from srpu_pipelines.assets._metadata import image_preview
from srpu_pipelines.config import Params
from srpu_pipelines.pipeline.steps import run_quantify
from srpu_pipelines.resources.dagster_resources import MlflowResource, ParamsResource


def _table(doc: dict) -> str:
    """Markdown: per group and phase, fraction with its interval, particles, median
    diameter, percolation and tortuosity."""
    lines = [
        "| group | phase | fraction (CI) | particles | median diameter | percolates x / y | "
        "tau x / y |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for g, s in doc["per_dataset"].items():
        unit = "µm" if s["length_unit"] == "um" else "px"
        for n, f in s["fractions"].items():
            ci = f"[{f['ci'][0]:.3f}, {f['ci'][1]:.3f}]" if f["ci"] else "(one image)"
            p = s["particles"][n]
            d = p[f"eq_diameter_{s['length_unit']}"]["median"]
            c = s["connectivity"][n]
            t = s["tortuosity"].get(n, {})

            def tau(ax: str, t=t) -> str:
                v = t.get(ax, {}).get("mean")
                return "-" if v is None else f"{v:.2f}"

            lines.append(
                f"| {g} | {n} | {f['mean']:.3f} {ci} | {p['count']} | "
                f"{'-' if d is None else f'{d:g} {unit}'} | "
                f"{c['percolates_x_share']:.0%} / {c['percolates_y_share']:.0%} | "
                f"{tau('x')} / {tau('y')} |"
            )
    return "\n".join(lines)


def microstructure_asset(params: Params) -> dg.AssetsDefinition:
    """The ``microstructure`` asset, downstream of the masks ``quantify.source`` names."""
    upstream = "dataset_index" if params.quantify.source == "labels" else "predictions"

    @dg.asset(
        name="microstructure",
        group_name="evaluation" if upstream == "dataset_index" else "inference",
        deps=[upstream],
        description="Phase fractions with confidence intervals, particle size distributions, "
        "interface and triple-phase-boundary densities, percolation and tortuosity of the "
        "masks quantify.source names, in µm where the pixel size is known (srpu quantify).",
    )
    def _microstructure(
        context: dg.AssetExecutionContext, params: ParamsResource, mlflow: MlflowResource
    ) -> dg.MaterializeResult:
        p = params.load()

        def progress(n: int) -> None:
            context.log.info(f"quantify: {n} images measured")

        doc = run_quantify(p, mlflow.tracker(p), progress=False, on_image=progress)
        out = Path(p.quantify.out_dir)
        meta = {
            "source": p.quantify.source,
            "images": len(doc["per_image"]),
            "quantities": dg.MetadataValue.md(_table(doc)),
            "json": dg.MetadataValue.path(str(out / "quantify.json")),
            "fractions": image_preview(out / "fractions.png"),
        }
        return dg.MaterializeResult(metadata=meta)

    return _microstructure
