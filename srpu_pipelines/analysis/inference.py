"""Full-size inference by sliding windows with overlap blending.

Tiles overlap; each tile's softmax is weighted by a window that falls off towards the
tile border (where a CNN sees least context) and the weighted sum is normalised, so
seams disappear. Images smaller than a tile are reflect-padded.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn


def autocast_ctx(enabled: bool):
    """bfloat16 autocast on the CPU where it is enabled, otherwise a no-op."""
    if enabled:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Does a /proc/cpuinfo text list AVX512-BF16 or AMX-BF16?"""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.cache
def bf16_supported() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX).

    oneDNN also "supports" bfloat16 on plain AVX512 by emulation, and torch's own check
    says yes there; measured on such a Xeon (avx512f/bw/vnni, no avx512_bf16): a training
    step 2.5x slower than fp32. So the CPU flags decide (Linux; elsewhere: fp32)."""
    try:
        native = cpu_has_native_bf16(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False
    try:
        return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(precision: str) -> bool:
    """Resolve a ``precision`` param ("auto" | "bf16" | "fp32") to whether to autocast."""
    return precision == "bf16" or (precision == "auto" and bf16_supported())


def _window(tile: int) -> torch.Tensor:
    ramp = torch.sin(torch.pi * (torch.arange(tile, dtype=torch.float32) + 0.5) / tile)
    w = torch.outer(ramp, ramp)
    return w.clamp_min(1e-3)


def _starts(size: int, tile: int, stride: int) -> list[int]:
    return sorted(set(list(range(0, size - tile + 1, stride)) + [size - tile]))


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    image: np.ndarray,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    bf16: bool = False,
    in_channels: int = 1,
) -> np.ndarray:
    """Class probabilities (C, H, W) float32 for a standardised (H, W) image.

    The grey image is repeated ``in_channels`` times for models that take more channels.
    """
    model.eval()
    h, w = image.shape
    ph, pw = max(0, tile - h), max(0, tile - w)
    x = np.pad(image, ((0, ph), (0, pw)), mode="reflect") if (ph or pw) else image
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    hp, wp = x.shape
    stride = max(1, int(round(tile * (1.0 - overlap))))
    coords = [(r, c) for r in _starts(hp, tile, stride) for c in _starts(wp, tile, stride)]
    win = _window(tile)
    acc: torch.Tensor | None = None
    norm = torch.zeros(hp, wp)
    for i in range(0, len(coords), batch_size):
        chunk = coords[i : i + batch_size]
        batch = torch.cat([t[..., r : r + tile, c : c + tile] for r, c in chunk])
        batch = batch.expand(-1, in_channels, -1, -1)
        with autocast_ctx(bf16):
            logits = model(batch)
        probs = logits.float().softmax(1)
        if acc is None:
            acc = torch.zeros(probs.shape[1], hp, wp)
        for p, (r, c) in zip(probs, chunk, strict=True):
            acc[:, r : r + tile, c : c + tile] += p * win
            norm[r : r + tile, c : c + tile] += win
    assert acc is not None
    return (acc / norm)[:, :h, :w].numpy()


def predict_labels(model: nn.Module, image: np.ndarray, **kw) -> np.ndarray:
    """uint8 (H, W) argmax class indices for a standardised (H, W) image."""
    return predict_probs(model, image, **kw).argmax(0).astype(np.uint8)
