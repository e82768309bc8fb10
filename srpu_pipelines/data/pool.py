"""Unlabelled tiles: random crops of pool images (and labelled images' pixels, never their
masks) for MAE pretraining and semi-supervised training.

Images are read on demand and kept in a small cache, so memory stays bounded however
large the pool is. An image's data bar (``data_bar_rows`` in the index) is cut off first:
it is not sample. Each tile is standardised with its whole sample's mean and standard
deviation (after the same min-max stretch as labelled images), exactly as the
segmentation model sees images at training and inference time.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from srpu_pipelines.data.dataset import read_sample
from srpu_pipelines.errors import InputError


def unlabeled_paths(
    index: dict[str, Any], pool: bool, labeled_splits: list[str], datasets: list[str] | None = None
) -> list[str]:
    """Image paths: the index's pool (when ``pool``) plus labelled items in
    ``labeled_splits``, optionally limited to ``datasets``; sorted and unique."""
    paths = set()
    if pool:
        paths |= {
            it["image"]
            for it in index.get("pool", [])
            if datasets is None or it["dataset"] in datasets
        }
    paths |= {
        it["image"]
        for it in index["items"]
        if it["split"] in labeled_splits and (datasets is None or it["dataset"] in datasets)
    }
    return sorted(paths)


def bar_rows(index: dict[str, Any]) -> dict[str, int]:
    """Image path -> rows of its data bar, for every pool and labelled image that has one."""
    return {
        it["image"]: int(it["data_bar_rows"])
        for it in [*index.get("pool", []), *index["items"]]
        if it.get("data_bar_rows")
    }


@functools.lru_cache(maxsize=64)
def _load(path: str, bar: int = 0) -> tuple[np.ndarray, float, float]:
    img = read_sample(path, bar)
    return img.astype(np.float32), float(img.mean()), max(float(img.std()), 1e-6)


def load_standardized(path: str, bar: int = 0) -> np.ndarray:
    """The image above its data bar (``bar`` rows), stretched and standardised: float32."""
    img, mean, std = _load(path, bar)
    return (img - mean) / std


class UnlabeledTiles(torch.utils.data.Dataset):
    """``length`` random ``tile`` x ``tile`` crops per epoch with random flips and
    90-degree turns (the weak augmentation). Item ``epoch * length + i`` is drawn from a
    generator seeded by (seed, epoch, i) alone, like :class:`TileSampler`'s."""

    def __init__(
        self,
        paths: list[str],
        tile: int,
        length: int,
        seed: int,
        source: str = "",
        bars: dict[str, int] | None = None,
    ) -> None:
        if not paths:
            raise InputError(
                "no unlabelled images: the index has no pool images (data.datasets raw "
                f"folders) and no labelled images in the splits named for unlabelled use{source}"
            )
        self.paths, self.tile, self.length, self.seed = paths, tile, length, seed
        self.bars = bars or {}

    def __len__(self) -> int:
        return self.length

    def generator(self, index: int, salt: int = 7) -> np.random.Generator:
        epoch, i = divmod(int(index), self.length)
        return np.random.default_rng([self.seed, epoch, i, salt])

    def __getitem__(self, index: int) -> torch.Tensor:
        """(1, T, T) float32 standardised tile."""
        rng, t = self.generator(index), self.tile
        path = self.paths[int(rng.integers(len(self.paths)))]
        img = load_standardized(path, self.bars.get(path, 0))
        ph, pw = max(0, t - img.shape[0]), max(0, t - img.shape[1])
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw)), mode="reflect")
        y = int(rng.integers(0, img.shape[0] - t + 1))
        x = int(rng.integers(0, img.shape[1] - t + 1))
        crop = img[y : y + t, x : x + t]
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        if rng.random() < 0.5:
            crop = crop[::-1]
        crop = np.rot90(crop, int(rng.integers(4)))
        return torch.from_numpy(np.ascontiguousarray(crop)[None].astype(np.float32))
