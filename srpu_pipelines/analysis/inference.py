"""Full-size inference by sliding windows with overlap blending, streamed in row bands.

Tiles overlap; each tile's softmax is weighted by a window that falls off towards the
tile border (where a CNN sees least context) and the weighted sum is normalised, so
seams disappear. Images smaller than a tile are reflect-padded.

Windows run in batches on the model's device and their weighted probabilities accumulate
in a band of rows on that device; as soon as no later window touches a row, the row is
final and leaves the band. So memory is a few tiles' height x the image width x classes,
whatever the image height: an 8k x 8k mosaic with 3 classes needs ~25 MB of float32 band
(tile 256), not 770 MB for the whole probability map. Labels come out as uint8; full
probability maps, where a caller needs them, as float16.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from srpu_pipelines.compute.device import Precision, module_device
from srpu_pipelines.data.dataset import resample_scale, resize_image, scaled_shape, standardize


def _window(tile: int, device: torch.device) -> torch.Tensor:
    ramp = torch.sin(torch.pi * (torch.arange(tile, dtype=torch.float32) + 0.5) / tile)
    return torch.outer(ramp, ramp).clamp_min(1e-3).to(device)


def window_starts(size: int, tile: int, stride: int) -> list[int]:
    """Start offsets of windows of ``tile`` covering ``size`` with ``stride`` (the last one
    flush with the end)."""
    return sorted(set(list(range(0, size - tile + 1, stride)) + [size - tile]))


_FLIPS = ((), (3,), (2,), (2, 3))  # none, left-right, up-down, both


def _window_probs(model: nn.Module, batch: torch.Tensor, prec: Precision, flips: bool):
    """Softmax (N, C, T, T) of a batch of windows, averaged over their flips if asked."""
    out = None
    for dims in _FLIPS if flips else ((),):
        with prec.autocast():
            logits = model(batch.flip(dims) if dims else batch)
        p = logits.float().softmax(1)
        p = p.flip(dims) if dims else p
        out = p if out is None else out + p
    assert out is not None
    return out / (len(_FLIPS) if flips else 1)


@torch.no_grad()
def iter_prob_bands(
    model: nn.Module,
    image: np.ndarray,
    tile: int = 256,
    overlap: float = 0.25,
    batch_size: int = 8,
    precision: Precision | None = None,
    in_channels: int = 1,
    channels_last: bool = False,
    flips: bool = False,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(y0, probs)`` for consecutive row bands of a standardised (H, W) image:
    ``probs`` is float32 (C, rows, W) on the model's device, rows y0..y0+rows-1, final.

    The grey image is repeated ``in_channels`` times for models that take more channels.
    With ``flips``, each window's probabilities are the mean over the window and its
    horizontal, vertical and double flips (test-time augmentation).
    """
    model.eval()
    device = module_device(model)
    prec = precision or Precision(device.type, None)
    h, w = image.shape
    ph, pw = max(0, tile - h), max(0, tile - w)
    x = np.pad(image, ((0, ph), (0, pw)), mode="reflect") if (ph or pw) else image
    src = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    hp, wp = x.shape
    stride = max(1, int(round(tile * (1.0 - overlap))))
    coords = [
        (r, c) for r in window_starts(hp, tile, stride) for c in window_starts(wp, tile, stride)
    ]
    win = _window(tile, device)
    acc: torch.Tensor | None = None  # (C, band rows, wp): rows buf0 .. buf0 + rows - 1
    norm = torch.zeros(0, wp, device=device)
    buf0 = emitted = 0
    for i in range(0, len(coords), batch_size):
        chunk = coords[i : i + batch_size]
        batch = torch.stack([src[r : r + tile, c : c + tile] for r, c in chunk])[:, None]
        batch = batch.to(device, non_blocking=True).expand(-1, in_channels, -1, -1)
        if channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        probs = _window_probs(model, batch, prec, flips) * win
        need = max(r for r, _ in chunk) + tile - buf0  # band rows this chunk reaches
        if acc is None:
            acc = torch.zeros(probs.shape[1], need, wp, device=device)
            norm = torch.zeros(need, wp, device=device)
        elif need > acc.shape[1]:
            grow = need - acc.shape[1]
            acc = torch.cat([acc, acc.new_zeros(acc.shape[0], grow, wp)], 1)
            norm = torch.cat([norm, norm.new_zeros(grow, wp)], 0)
        for p, (r, c) in zip(probs, chunk, strict=True):
            acc[:, r - buf0 : r - buf0 + tile, c : c + tile] += p
            norm[r - buf0 : r - buf0 + tile, c : c + tile] += win
        # rows above the next window's start get nothing more: they are final
        done_to = coords[i + batch_size][0] if i + batch_size < len(coords) else hp
        done_to = min(done_to, h)
        if done_to > emitted:
            k = done_to - buf0
            yield emitted, (acc[:, :k, :w] / norm[:k, :w]).contiguous()
            acc, norm = acc[:, k:], norm[k:]
            buf0 = emitted = done_to


def input_scale(config: dict, pixel_size_nm: float | None) -> float:
    """How much an image of ``pixel_size_nm`` is enlarged before the model of checkpoint
    ``config`` sees it: to the pixel size it was trained at (``resample_nm``; not for a
    model trained at native pixels or an image of unknown pixel size), times the
    enlargement it was trained with (``upsample``)."""
    up = float(config.get("upsample") or 1.0)
    return resample_scale(pixel_size_nm, config.get("resample_nm")) * up


def resize_probs(probs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(C, h, w) probabilities resampled bilinearly to (C, *shape), float32: the class
    decision is then made at the image's own pixels."""
    if tuple(probs.shape[1:]) == tuple(shape):
        return probs.astype(np.float32, copy=False)
    return np.stack([resize_image(p.astype(np.float32), shape) for p in probs])


def scaled_input(image: np.ndarray, scale: float) -> np.ndarray:
    """A standardised image resampled by ``scale`` and standardised again: what training
    gave a model trained on resampled pixels (the image resampled, then standardised)."""
    return standardize(resize_image(image, scaled_shape(image.shape, scale)))


def _probs_at(model: nn.Module, image: np.ndarray, scale: float, **kw) -> np.ndarray:
    """float32 (C, H, W) probabilities of a standardised image predicted at ``scale`` x
    its size (:func:`scaled_input`) and resampled back."""
    return resize_probs(predict_probs(model, scaled_input(image, scale), **kw), image.shape)


def predict_labels(model: nn.Module, image: np.ndarray, scale: float = 1.0, **kw) -> np.ndarray:
    """uint8 (H, W) argmax class indices for a standardised (H, W) image (keywords as
    :func:`iter_prob_bands`).

    ``scale`` != 1 (a model trained on resampled pixels, :func:`input_scale`): the image is
    resampled by ``scale``, predicted there, and the probabilities resampled back before
    the argmax. That path holds the whole probability map (not a band at a time)."""
    if scale != 1.0:
        return _probs_at(model, image, scale, **kw).argmax(0).astype(np.uint8)
    out = np.empty(image.shape, np.uint8)
    for y0, p in iter_prob_bands(model, image, **kw):
        out[y0 : y0 + p.shape[1]] = p.argmax(0).to(torch.uint8).cpu().numpy()
    return out


def predict_probs(model: nn.Module, image: np.ndarray, scale: float = 1.0, **kw) -> np.ndarray:
    """Class probabilities (C, H, W) float16 for a standardised (H, W) image (keywords as
    :func:`iter_prob_bands`; ``scale`` as :func:`predict_labels`): half the memory of
    float32, precise to ~1e-3."""
    if scale != 1.0:
        return _probs_at(model, image, scale, **kw).astype(np.float16)
    out: np.ndarray | None = None
    for y0, p in iter_prob_bands(model, image, **kw):
        if out is None:
            out = np.empty((p.shape[0], *image.shape), np.float16)
        out[:, y0 : y0 + p.shape[1]] = p.to(torch.float16).cpu().numpy()
    assert out is not None
    return out
