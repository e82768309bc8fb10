"""Masks: decode files into class-index images and encode them back as mask files.

A class-index image is uint8 (H, W) holding 0..C-1, or ``IGNORE_INDEX`` (255) for pixels
that carry no label (the ignore colour, e.g. an SEM information bar).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from srpu_pipelines.config import IGNORE_INDEX, Params
from srpu_pipelines.data.imageio import ImageReadError, read_raw
from srpu_pipelines.errors import UserError
from srpu_pipelines.io.files import atomic_write_with


class MaskDecodeError(UserError, ValueError):
    """A mask whose pixels do not decode to classes; the message names the file."""


@dataclass(frozen=True)
class MaskCodec:
    """How masks map to classes. Build it with :meth:`from_params`."""

    encoding: str
    colors: tuple[tuple[int, int, int], ...]
    default_class: int | None = None
    ignore_color: tuple[int, int, int] | None = None
    grey_levels: tuple[int, ...] | None = None
    color_tolerance: int = 0

    @classmethod
    def from_params(cls, params: Params) -> MaskCodec:
        m = params.mask
        default = params.class_names.index(m.default_class) if m.default_class else None
        return cls(
            encoding=m.encoding,
            colors=tuple(tuple(c.color) for c in params.classes),
            default_class=default,
            ignore_color=tuple(m.ignore_color) if m.ignore_color else None,
            grey_levels=tuple(m.grey_levels) if m.grey_levels else None,
            color_tolerance=m.color_tolerance,
        )

    @property
    def num_classes(self) -> int:
        return len(self.colors)

    # -- decoding -----------------------------------------------------------------------
    def decode_file(self, path: str | Path) -> np.ndarray:
        """Read and decode a mask file to a uint8 (H, W) class-index image."""
        return self.decode_file_counted(path)[0]

    def decode_file_counted(self, path: str | Path) -> tuple[np.ndarray, int]:
        """(class-index image, pixels snapped to a class colour within the tolerance)."""
        path = Path(path)
        raw = read_raw(path, palette="index" if self.encoding == "index" else "rgb")
        try:
            return self.decode_array_counted(raw)
        except MaskDecodeError as e:
            raise MaskDecodeError(f"{path}: {e}") from None

    def decode_array(self, raw: np.ndarray) -> np.ndarray:
        return self.decode_array_counted(raw)[0]

    def decode_array_counted(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        if self.encoding == "color":
            return self._decode_color(raw)
        grey = _single_channel(raw)
        if self.encoding == "index":
            return self._decode_index(grey), 0
        return self._decode_grey(grey), 0

    def _decode_index(self, grey: np.ndarray) -> np.ndarray:
        vals = np.unique(grey)
        bad = [int(v) for v in vals if not (0 <= v < self.num_classes or v == IGNORE_INDEX)]
        if bad:
            raise MaskDecodeError(
                f"index mask holds values {bad[:10]} that are no class "
                f"(valid 0..{self.num_classes - 1}, or {IGNORE_INDEX} for unlabelled)"
            )
        return grey.astype(np.uint8)

    def _decode_grey(self, grey: np.ndarray) -> np.ndarray:
        assert self.grey_levels is not None
        out = np.full(grey.shape, 255, np.uint8)
        known = np.zeros(grey.shape, bool)
        for k, level in enumerate(self.grey_levels):
            hit = grey == level
            out[hit] = k
            known |= hit
        return self._fill_unknown(out, known, lambda: np.unique(grey[~known])[:10].tolist())

    def _decode_color(self, raw: np.ndarray) -> tuple[np.ndarray, int]:
        if raw.ndim == 2:
            rgb = np.repeat(raw[..., None], 3, axis=-1)
        else:
            rgb = raw[..., :3] if raw.shape[-1] >= 3 else np.repeat(raw[..., :1], 3, axis=-1)
        if rgb.dtype != np.uint8:
            if rgb.dtype == np.uint16:
                # 16-bit painters store pure colours as 0 / 65535: back to 8-bit colours
                rgb = np.round(rgb / 257.0).astype(np.uint8)
            elif np.issubdtype(rgb.dtype, np.integer) and rgb.min() >= 0 and rgb.max() <= 255:
                rgb = rgb.astype(np.uint8)
            else:
                raise MaskDecodeError(
                    f"colour mask of type {rgb.dtype} is not supported; save 8- or 16-bit colours"
                )
        # One integer per pixel makes the colour lookup a single vectorised compare.
        packed = (
            (rgb[..., 0].astype(np.int32) << 16)
            | (rgb[..., 1].astype(np.int32) << 8)
            | rgb[..., 2].astype(np.int32)
        )
        out = np.full(packed.shape, 255, np.uint8)
        known = np.zeros(packed.shape, bool)
        for k, (r, g, b) in enumerate(self.colors):
            hit = packed == ((r << 16) | (g << 8) | b)
            out[hit] = k
            known |= hit
        if self.ignore_color is not None:
            r, g, b = self.ignore_color
            known |= packed == ((r << 16) | (g << 8) | b)
        snapped = self._snap(packed, out, known) if self.color_tolerance else 0

        def unknown_colors() -> list:
            vals, counts = np.unique(packed[~known], return_counts=True)
            top = vals[np.argsort(-counts)[:5]]
            return [((int(v) >> 16) & 255, (int(v) >> 8) & 255, int(v) & 255) for v in top]

        return self._fill_unknown(out, known, unknown_colors), snapped

    def _snap(self, packed: np.ndarray, out: np.ndarray, known: np.ndarray) -> int:
        """Pixels whose colour has every channel within ``color_tolerance`` of exactly one
        class colour (or the ignore colour) become that class, in place; a colour within
        it of two is an error. With a default class, neutral greys are left to it. Returns
        how many pixels snapped."""
        todo = ~known
        if self.default_class is not None:
            # a mask painted over its micrograph: neutral greys are unpainted pixels (the
            # default class), not brush edges of a black, white or grey class colour
            r, g, b = (packed >> 16) & 255, (packed >> 8) & 255, packed & 255
            todo &= ~((r == g) & (g == b))
        if not todo.any():
            return 0
        vals, inverse = np.unique(packed[todo], return_inverse=True)
        rgb = np.stack([(vals >> 16) & 255, (vals >> 8) & 255, vals & 255], -1)
        targets = [(k, c) for k, c in enumerate(self.colors)]
        if self.ignore_color is not None:
            targets.append((IGNORE_INDEX, self.ignore_color))
        tc = np.array([c for _, c in targets], np.int32)
        within = np.abs(rgb[:, None, :] - tc[None]).max(-1) <= self.color_tolerance
        both = np.flatnonzero(within.sum(1) > 1)
        if both.size:
            v = tuple(int(x) for x in rgb[both[0]])
            names = [str(targets[j][0]) for j in np.flatnonzero(within[both[0]])]
            raise MaskDecodeError(
                f"colour {v} is within mask.color_tolerance ({self.color_tolerance}) of "
                f"several class colours (classes {', '.join(names)}; {IGNORE_INDEX} = the ignore "
                "colour): lower mask.color_tolerance or repaint those pixels"
            )
        label = np.full(len(vals), -1, np.int32)
        hit = within.any(1)
        label[hit] = np.array([k for k, _ in targets], np.int32)[within[hit].argmax(1)]
        lab = label[inverse.ravel()]
        sel = lab >= 0
        sub = out[todo]
        sub[sel] = lab[sel]
        out[todo] = sub
        got = known[todo]
        got[sel] = True
        known[todo] = got
        return int(sel.sum())

    def _fill_unknown(self, out: np.ndarray, known: np.ndarray, describe) -> np.ndarray:
        if known.all():
            return out
        if self.default_class is not None:
            out[~known] = self.default_class
            return out
        n = int((~known).sum())
        raise MaskDecodeError(
            f"{n} pixels ({100.0 * n / known.size:.2f} %) match no class "
            f"(most common: {describe()}); set mask.default_class for unpainted pixels "
            "or fix the mask colours"
        )

    # -- encoding -----------------------------------------------------------------------
    def to_color(self, index: np.ndarray) -> np.ndarray:
        """uint8 (H, W, 3) colour mask from a class-index image (ignored pixels: ignore colour)."""
        lut = np.zeros((256, 3), np.uint8)
        lut[: self.num_classes] = np.array(self.colors, np.uint8)
        if self.ignore_color is not None:
            lut[IGNORE_INDEX] = self.ignore_color
        return lut[index]

    def indexed_image(self, index: np.ndarray) -> Image.Image:
        """An indexed ('P') image: pixel value = class (``IGNORE_INDEX`` not labelled), the
        class colours as its palette, so painters show colours and the values stay."""
        lut = self.to_color(np.arange(256, dtype=np.uint8)[None])[0]  # (256, 3)
        h, w = index.shape
        im = Image.frombytes("P", (w, h), np.ascontiguousarray(index, np.uint8))
        im.putpalette(lut.ravel().tolist())
        return im

    def encode_image(self, index: np.ndarray) -> Image.Image:
        """A class-index image as a mask file of this codec's encoding, which
        ``decode_file`` reads back to the same classes: colours (``color``), an indexed
        PNG whose values are the classes (``index``), or the grey levels (``grey``).
        A grey mask has no value for "unlabelled": such pixels (a prediction's data bar)
        are written as class 0's level, and the bar is unlabelled again when the mask is
        read (``item_mask`` applies ``with_bar``)."""
        if self.encoding == "color":
            return Image.fromarray(self.to_color(index))
        if self.encoding == "index":
            return self.indexed_image(index)
        assert self.grey_levels is not None
        lut = np.full(256, self.grey_levels[0], np.uint8)
        lut[: self.num_classes] = np.array(self.grey_levels, np.uint8)
        return Image.fromarray(lut[index])

    def save_png(self, path: str | Path, index: np.ndarray) -> None:
        """Write ``encode_image(index)`` to ``path`` atomically as PNG."""
        im = self.encode_image(index)
        atomic_write_with(Path(path), lambda tmp: im.save(tmp, format="PNG"))


def with_bar(mask: np.ndarray, height: int, bar_rows: int) -> np.ndarray:
    """``mask`` with its image's data bar (the bottom ``bar_rows`` of ``height``) not
    labelled: a mask that stops above the bar is extended by unlabelled rows."""
    if mask.shape[0] == height - bar_rows and bar_rows:
        pad = np.full((bar_rows, mask.shape[1]), IGNORE_INDEX, np.uint8)
        return np.vstack([mask, pad])
    if bar_rows:
        mask = mask.copy()
        mask[height - bar_rows :] = IGNORE_INDEX
    return mask


def item_mask(item: dict, codec: MaskCodec) -> np.ndarray:
    """The class-index mask of an index entry, its data bar not labelled."""
    mask = codec.decode_file(Path(item["mask"]))
    return with_bar(mask, int(item["height"]), int(item.get("data_bar_rows") or 0))


def _single_channel(raw: np.ndarray) -> np.ndarray:
    if raw.ndim == 2:
        return raw
    ch = raw[..., :3] if raw.shape[-1] >= 3 else raw[..., :1]
    if ch.shape[-1] == 3 and not (
        np.array_equal(ch[..., 0], ch[..., 1]) and np.array_equal(ch[..., 0], ch[..., 2])
    ):
        raise MaskDecodeError(
            "mask has colours but mask.encoding expects a single-channel (index or grey) mask; "
            "set mask.encoding: color"
        )
    return ch[..., 0]


def class_fractions(index: np.ndarray, num_classes: int) -> list[float]:
    """Share of labelled pixels per class (ignored pixels excluded)."""
    counts = np.bincount(index.ravel(), minlength=256)[:num_classes].astype(np.float64)
    total = counts.sum()
    return [float(c / total) if total else 0.0 for c in counts]


__all__ = [
    "MaskCodec",
    "MaskDecodeError",
    "ImageReadError",
    "class_fractions",
    "item_mask",
    "with_bar",
]
