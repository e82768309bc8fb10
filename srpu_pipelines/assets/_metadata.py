"""Metadata a person wants to see in the Dagster UI: tables and preview pictures."""

from __future__ import annotations

import base64
import io
import math
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
from PIL import Image


def iou_table(metrics: dict[str, Any]) -> dg.MetadataValue:
    """Markdown table: class | IoU | Dice, then the means."""
    rows = ["| class | IoU | Dice |", "| --- | ---: | ---: |"]

    def f(v: float | None) -> str:
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"

    for cls, v in metrics["iou"].items():
        rows.append(f"| {cls} | {f(v)} | {f(metrics['dice'].get(cls))} |")
    rows.append(f"| **mean** | **{f(metrics['miou'])}** | **{f(metrics['mdice'])}** |")
    return dg.MetadataValue.md("\n".join(rows))


def png_md(path: str | Path | np.ndarray, max_width: int = 640) -> str:
    """Markdown for a PNG shown inline (base64), scaled down to ``max_width``; 16-bit
    micrographs are stretched to 8 bits for display."""
    arr = np.asarray(path if isinstance(path, np.ndarray) else Image.open(path))
    if arr.dtype != np.uint8:
        a = arr.astype(np.float64)
        arr = ((a - a.min()) / max(float(np.ptp(a)), 1e-9) * 255).astype(np.uint8)
    im = Image.fromarray(arr)
    if im.width > max_width:
        im = im.resize((max_width, max(1, round(im.height * max_width / im.width))))
    buf = io.BytesIO()
    im.convert("RGB").save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    return f"![preview](data:image/png;base64,{data})"


def image_preview(path: str | Path | np.ndarray, max_width: int = 640) -> dg.MetadataValue:
    """A PNG shown inline in the UI, scaled down to ``max_width``."""
    return dg.MetadataValue.md(png_md(path, max_width))


def curve_png(history: list[dict], loss_key: str, loss_label: str) -> np.ndarray:
    """A loss curve per epoch (and validation mIoU where the history has it), RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h[loss_key] for h in history], "o-", label=loss_label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(loss_label)
    if any("val_miou" in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(
            ep, [h.get("val_miou") for h in history], "s-", color="tab:orange", label="val mIoU"
        )
        ax2.set_ylabel("val mIoU")
        ax2.set_ylim(0, 1)
    fig.tight_layout()
    fig.canvas.draw()
    arr = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return arr
