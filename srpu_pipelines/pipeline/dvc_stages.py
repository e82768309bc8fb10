"""dvc.yaml from params.yaml: the same stages as the Dagster assets, with the same names.

The training stages are a list in params.yaml, so dvc.yaml is written from it
(`srpu stages --write-dvc`, run by `make repro`) rather than kept in step by hand. Data
dependencies come from ``data.datasets`` and ``predict.input_dir``, outputs from the
``*.out_dir`` keys. Checkpoint outputs are ``persist: true``: DVC would otherwise delete
them before a stage runs, and the stage could not resume or see that nothing changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from srpu_pipelines.config import Params
from srpu_pipelines.io.files import atomic_write_bytes
from srpu_pipelines.pipeline.steps import (
    final_dir,
    mae_record_path,
    stage_asset_name,
    stage_dir,
    uses_mae,
)

HEADER = """\
# Written by `srpu stages --write-dvc` from params.yaml (run by `make repro`): edit
# params.yaml, not this file. The same stages as the Dagster assets, same names and params
# keys, each running the srpu CLI.
"""


def _p(path: Path | str) -> str:
    return Path(path).as_posix()


def _uncached(path: Path | str) -> dict[str, Any]:
    return {_p(path): {"cache": False}}


def _kept(path: Path | str) -> dict[str, Any]:
    """A small output DVC must leave in place: a finished run returns early and does not
    write it again."""
    return {_p(path): {"persist": True, "cache": False}}


def _persist(path: Path | str, cache: bool = True) -> dict[str, Any]:
    return {_p(path): {"persist": True, **({} if cache else {"cache": False})}}


def dvc_stages(params: Params) -> dict[str, Any]:
    """The ``stages:`` mapping of dvc.yaml for ``params``."""
    idx = _p(params.data.index_path)
    data_deps = sorted(
        {
            _p(getattr(d, key))
            for d in params.data.datasets
            for key in ("labeled", "masks", "raw")
            if getattr(d, key) is not None
        }
    )
    if params.data.split.split_file:
        data_deps.append(_p(params.data.split.split_file))
    stages: dict[str, Any] = {
        "dataset_index": {
            "cmd": "srpu -q index",
            "deps": [*data_deps, "srpu_pipelines/data"],
            "params": ["seed", "classes", "mask", "data"],
            # the previous index keeps old images in their splits
            "outs": [_persist(idx, cache=False)],
        }
    }
    if uses_mae(params):
        mae = Path(params.pretrain.out_dir)
        stages["mae_encoder"] = {
            "cmd": "srpu -q pretrain",
            "deps": [
                idx,
                "srpu_pipelines/training/mae.py",
                "srpu_pipelines/training/pretrain.py",
                "srpu_pipelines/training/loop.py",
                "srpu_pipelines/data/pool.py",
                "srpu_pipelines/models",
                "srpu_pipelines/compute",
            ],
            "params": ["seed", "classes", "model", "pretrain", "tracking"],
            "outs": [
                _persist(mae / "encoder.pt"),
                _kept(mae / "encoder.json"),
                _persist(mae / "last.pt"),
                _kept(mae / "last.json"),
                _kept(mae / "reconstructions.png"),
                _kept(mae_record_path(params)),
            ],
            "metrics": [_kept(mae / "pretrain_metrics.json")],
        }
    for i, st in enumerate(params.stages):
        out = stage_dir(params, st.name)
        deps = [
            idx,
            "srpu_pipelines/training",
            "srpu_pipelines/models",
            "srpu_pipelines/compute",
            "srpu_pipelines/data/dataset.py",
            "srpu_pipelines/data/pool.py",
        ]
        if st.init_kind == "mae":
            deps.append(_p(Path(params.pretrain.out_dir) / "encoder.pt"))
        elif st.init_kind == "previous":
            deps.append(_p(stage_dir(params, params.stages[i - 1].name) / "best.pt"))
        elif st.init_kind == "file":
            deps.append(_p(st.init_arg))
        stages[stage_asset_name(st.name)] = {
            "cmd": f"srpu -q train --stage {st.name}",
            "deps": deps,
            "params": ["seed", "classes", "model", "train", "stages", "inference", "tracking"],
            "outs": [
                _persist(out / "best.pt"),
                _kept(out / "best.json"),
                _persist(out / "last.pt"),
                _kept(out / "last.json"),
                _kept(out / "model_version.json"),
            ],
            "metrics": [_kept(out / "train_metrics.json")],
        }
        if st.init_kind == "alias":
            # the alias can move to another version: ask the stage (it is idempotent)
            stages[stage_asset_name(st.name)]["always_changed"] = True
    final = final_dir(params)
    ev = Path(params.evaluate.out_dir)
    stages["evaluation"] = {
        "cmd": "srpu -q evaluate",
        "deps": [
            idx,
            _p(final / f"{params.evaluate.checkpoint}.pt"),
            _p(final / "model_version.json"),  # the run its scores are logged into
            "srpu_pipelines/analysis",
        ],
        "params": ["classes", "evaluate", "inference", "tracking"],
        "outs": [_p(ev / "overlays")],
        "metrics": [_uncached(ev / "metrics.json")],
    }
    stages["champion_model"] = {
        "cmd": "srpu -q promote",
        "deps": [_p(final / "model_version.json"), _p(ev / "metrics.json")],
        "params": ["tracking"],
        "outs": [_uncached(ev / "promotion.json")],
    }
    stages["predictions"] = {
        "cmd": "srpu -q predict",
        "deps": [
            _p(params.predict.input_dir),
            _p(ev / "promotion.json"),
            _p(final / f"{params.evaluate.checkpoint}.pt"),  # with predict.source: checkpoint
            "srpu_pipelines/analysis",
            "srpu_pipelines/models",
        ],
        "params": ["classes", "predict", "inference", "evaluate.checkpoint", "tracking"],
        "outs": [_p(params.predict.out_dir)],
    }
    qp = params.quantify
    stages["microstructure"] = {
        "cmd": "srpu -q quantify",
        "deps": ([idx, *data_deps] if qp.source == "labels" else [_p(params.predict.out_dir)])
        + ["srpu_pipelines/analysis/quantify.py"],
        "params": ["classes", "mask", "quantify", "tracking"]
        + (["predict.out_dir"] if qp.source == "predictions" else []),
        "outs": [_p(qp.out_dir)],
    }
    al = Path(params.active.out_dir)
    stages["uncertainty_scores"] = {
        "cmd": "srpu -q score",
        "deps": [idx, _p(ev / "promotion.json"), "srpu_pipelines/active_learning"],
        "params": ["classes", "active", "inference", "tracking"],
        # one record per pool image and model version: kept, only stale ones are redone
        "outs": [_kept(al / "scores")],
    }
    stages["selected_batch"] = {
        "cmd": "srpu -q select",
        "deps": [idx, _p(al / "scores"), "srpu_pipelines/active_learning"],
        "params": ["seed", "classes", "mask.suffix", "active", "tracking"],
        # rounds are what people correct: never deleted, a new one per model and label set
        "outs": [_kept(al / "rounds")],
    }
    return stages


def dvc_yaml_text(params: Params) -> str:
    body = yaml.safe_dump({"stages": dvc_stages(params)}, sort_keys=False, width=100)
    return HEADER + body


def sync_dvc_yaml(params: Params, path: Path, write: bool) -> bool:
    """Is ``path`` out of step with ``params``? With ``write``, rewrite it (atomically)."""
    text = dvc_yaml_text(params)
    changed = not path.is_file() or path.read_text(encoding="utf-8") != text
    if changed and write:
        atomic_write_bytes(path, text.encode("utf-8"))
    return changed
