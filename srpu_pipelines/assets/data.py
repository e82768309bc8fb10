"""Data assets: the dataset index, with checks on what it lists."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import numpy as np

from srpu_pipelines.analysis.evaluate import overlay_figure
from srpu_pipelines.assets._metadata import image_preview
from srpu_pipelines.data.dataset import load_samples
from srpu_pipelines.data.index import load_index, missing_classes_per_split, verify_items
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.pipeline.steps import run_index
from srpu_pipelines.resources.dagster_resources import DvcResource, ParamsResource


@dg.asset(
    group_name="data",
    description="Every labelled pair and pool image: hashes, sizes, "
    "class fractions and splits (srpu index).",
)
def dataset_index(params: ParamsResource) -> dg.MaterializeResult:
    p = params.load()
    res = run_index(p, progress=False)
    idx = res["index"]
    rows = [
        "| split | images | " + " | ".join(p.class_names) + " |",
        "| --- | ---: |" + " ---: |" * p.num_classes,
    ]
    for split in sorted({it["split"] for it in idx["items"]}):
        items = [it for it in idx["items"] if it["split"] == split]
        frac = np.mean([it["class_fractions"] for it in items], axis=0)
        rows.append(f"| {split} | {len(items)} | " + " | ".join(f"{f:.3f}" for f in frac) + " |")
    meta = {
        "labelled": idx["counts"]["labeled"],
        "pool": idx["counts"]["pool"],
        "skipped": idx["counts"]["skipped"],
        "data_revision": res["revision"],
        "splits": dg.MetadataValue.md("\n".join(rows)),
        "path": dg.MetadataValue.path(str(p.data.index_path)),
    }
    if idx["skipped"]:
        meta["skipped_files"] = dg.MetadataValue.md(
            "\n".join(f"- `{s['path']}`: {s['reason']}" for s in idx["skipped"])
        )
    if idx["items"]:  # the first pair: micrograph | its mask over it
        codec = MaskCodec.from_params(p)
        s = load_samples(idx["items"][:1], codec, progress=False)[0]
        fig = overlay_figure(s.image, codec.to_color(s.mask), codec.to_color(s.mask))
        meta["preview"] = image_preview(fig[:, : 2 * s.image.shape[1] + 6])
    return dg.MaterializeResult(metadata=meta, data_version=dg.DataVersion(res["revision"]))


@dg.asset_check(
    asset=dataset_index,
    description="Every mask decodes and matches its image's size; no file changed since indexing.",
)
def masks_decode_and_fit(params: ParamsResource) -> dg.AssetCheckResult:
    p = params.load()
    found = verify_items(load_index(p.data.index_path), p)
    bad = [m for v in found.values() for m in v]
    return dg.AssetCheckResult(
        passed=not bad,
        metadata={k: len(v) for k, v in found.items()},
        description="\n".join(bad[:20]) or "all masks decode at their image's size",
    )


@dg.asset_check(asset=dataset_index, description="train, val and test each hold every class.")
def splits_hold_every_class(params: ParamsResource) -> dg.AssetCheckResult:
    p = params.load()
    missing = missing_classes_per_split(load_index(p.data.index_path), p.class_names)
    return dg.AssetCheckResult(
        passed=not missing,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={s: ", ".join(c) for s, c in missing.items()} or {"missing": "none"},
    )


@dg.asset(
    group_name="data",
    deps=["dataset_index"],
    description="The labelled folders committed to DVC (dvc add, dvc push): every label "
    "version stays in the DVC cache and remote. Folders DVC does not track are left alone.",
)
def labeled_data(context, params: ParamsResource, dvc: DvcResource) -> dg.MaterializeResult:
    # (context unannotated: with postponed annotations Dagster cannot read the string)
    from srpu_pipelines.resources.dvc import tracked_folders

    p = params.load()
    folders = [Path(f) for d in p.data.datasets for f in (d.labeled, d.masks) if f is not None]
    untracked = tracked_folders(folders)[1]
    for f in untracked:
        context.log.warning(
            f"{f} is not DVC-tracked: its labels are not versioned (run `dvc add` on it, or "
            "on a folder above it, once)"
        )
    md5 = dvc.client().add(folders)
    rows = ["| folder | DVC md5 |", "| --- | --- |"] + [f"| {f} | {h} |" for f, h in md5.items()]
    return dg.MaterializeResult(
        metadata={
            "committed": len(md5),
            "not_tracked": dg.MetadataValue.md("\n".join(f"- {f}" for f in untracked) or "none"),
            "versions": dg.MetadataValue.md("\n".join(rows)),
        }
    )
