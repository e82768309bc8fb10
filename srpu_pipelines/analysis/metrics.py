"""Per-class IoU and Dice from a confusion matrix accumulated over whole images.

Scores are computed over all pixels of a set of images together (not averaged per image),
so a small image does not count as much as a large one; ignored pixels (255) are skipped.
A class absent from both truth and prediction gets NaN, and means skip NaN.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchmetrics.functional.classification import multiclass_confusion_matrix

from srpu_pipelines.config import IGNORE_INDEX
from srpu_pipelines.errors import InputError


class ConfusionAccumulator:
    """Sum of confusion matrices (rows: truth, columns: prediction)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def update(self, pred: np.ndarray, truth: np.ndarray) -> None:
        if pred.shape != truth.shape:
            raise InputError(f"prediction {pred.shape} and truth {truth.shape} differ in size")
        p = torch.from_numpy(pred.astype(np.int64)).reshape(-1)
        t = torch.from_numpy(truth.astype(np.int64)).reshape(-1)
        self.matrix += multiclass_confusion_matrix(
            p, t, self.num_classes, ignore_index=IGNORE_INDEX, validate_args=False
        ).long()

    def scores(self, class_names: list[str]) -> dict[str, Any]:
        return scores_from_confusion(self.matrix.numpy(), class_names)


def _nanmean(vals: list[float]) -> float:
    ok = [v for v in vals if not math.isnan(v)]
    return float(np.mean(ok)) if ok else float("nan")


def scores_from_confusion(cm: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """{"iou": {class: v}, "dice": {...}, "miou", "mdice", "pixel_accuracy", "pixels"}."""
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(tp + fp + fn > 0, tp / (tp + fp + fn), np.nan)
        dice = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    total = cm.sum()
    return {
        "iou": {n: float(v) for n, v in zip(class_names, iou, strict=True)},
        "dice": {n: float(v) for n, v in zip(class_names, dice, strict=True)},
        "miou": _nanmean(list(iou)),
        "mdice": _nanmean(list(dice)),
        "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
        "pixels": int(total),
    }
