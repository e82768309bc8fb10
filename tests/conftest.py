"""Shared fixtures: tiny params and tiny demo data under a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from srpu_pipelines.config import Params, parse_params

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
torch.set_num_threads(2)

ROOT = Path(__file__).resolve().parents[1]
CI = os.environ.get("CI", "").lower() == "true"


def requires_tool(present: bool, reason: str) -> pytest.MarkDecorator:
    """Skip a test whose tool (DVC, PostgreSQL, a browser) is missing, with ``reason``;
    under CI=true fail it instead: there `make test` installs them, so missing is a fault."""
    return pytest.mark.requires_tool(present=present, reason=reason)


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("requires_tool"):
        if not mark.kwargs["present"]:
            if CI:
                pytest.fail(f"CI=true and {mark.kwargs['reason']}", pytrace=False)
            pytest.skip(mark.kwargs["reason"])


NASA = (ROOT / ".." / "shared" / "data" / "nasa-super").resolve()
COLORS = [(255, 0, 0), (0, 0, 255), (0, 255, 0)]


def tiny_params_dict(tmp: Path, **overrides: Any) -> dict[str, Any]:
    """A params mapping for 64 px demo data and a tiny model, rooted at ``tmp``."""
    d: dict[str, Any] = {
        "seed": 0,
        "classes": [
            {"name": "active_material", "color": list(COLORS[0])},
            {"name": "solid_electrolyte", "color": list(COLORS[1])},
            {"name": "carbon", "color": list(COLORS[2])},
        ],
        "mask": {"encoding": "color", "ignore_color": [255, 255, 255]},
        "data": {
            "datasets": [
                {
                    "name": "a",
                    "labeled": str(tmp / "demo/labeled/a"),
                    "raw": str(tmp / "demo/raw/a"),
                },
                {
                    "name": "b",
                    "labeled": str(tmp / "demo/labeled/b"),
                    "raw": str(tmp / "demo/raw/b"),
                },
            ],
            "index_path": str(tmp / "out/index.json"),
            "split": {"val": 0.25, "test": 0.25},
        },
        "model": {
            "arch": "unet",
            "encoder": "resnet18",
            "encoder_depth": 3,
            "decoder_channels": [32, 16, 8],
        },
        "train": {
            "out_dir": str(tmp / "out/train"),
            "epochs": 2,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "tile_size": 64,
            "warmup_steps": 1,
            "threads": 2,
            # eager and in process everywhere (one marked test each tries the others)
            "compile": "off",
            "workers": 0,
        },
        "pretrain": {
            "out_dir": str(tmp / "out/mae"),
            "epochs": 1,
            "steps_per_epoch": 2,
            "batch_size": 2,
            "tile_size": 64,
            "patch_size": 16,
            "decoder_dim": 16,
            "decoder_depth": 1,
            "warmup_steps": 1,
            "reconstructions": 1,
            "compile": "off",
            "workers": 0,
        },
        "inference": {"tile_size": 64, "batch_size": 4},
        "active": {
            "out_dir": str(tmp / "out/active"),
            "tile_size": 32,
            "batch_size": 2,
            "ensemble": {"members": 2},
        },
        "evaluate": {"out_dir": str(tmp / "out/eval"), "overlays": 1},
        "predict": {
            "input_dir": str(tmp / "demo/predict"),
            "out_dir": str(tmp / "out/pred"),
            "source": "checkpoint",
            "models_cache": str(tmp / "out/models"),
        },
        # off by default in tests; tests of tracking turn it on with a temporary database
        "tracking": {
            "enabled": False,
            "default_db": str(tmp / "mlruns/mlflow.db"),
            "artifact_root": str(tmp / "mlruns/artifacts"),
        },
        "demo": {
            "out_dir": str(tmp / "demo"),
            "datasets": ["a", "b"],
            "labeled_per_dataset": 4,
            "pool_per_dataset": 2,
            "predict_images": 1,
            "size": 64,
            "info_bar": 8,
        },
    }
    for key, val in overrides.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return d


@pytest.fixture
def tiny_params(tmp_path: Path) -> Params:
    return parse_params(tiny_params_dict(tmp_path))


@pytest.fixture
def demo_params(tmp_path: Path) -> Params:
    """Tiny params with the demo data already generated."""
    from srpu_pipelines.data.demo import generate_demo

    p = parse_params(tiny_params_dict(tmp_path))
    generate_demo(p)
    return p


def save(path: Path, arr: np.ndarray, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def color_mask(index: np.ndarray) -> np.ndarray:
    lut = np.array(COLORS + [(0, 0, 0)] * 252 + [(255, 255, 255)], np.uint8)
    return lut[index]
