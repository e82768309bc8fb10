"""Finding labelled pairs and pool images on disk.

Layouts: ``NAME.ext`` + ``NAME_mask.ext`` side by side in one folder, or images in one
folder and masks of the same name in another; unlabelled images in a raw folder form the
pool. Anything that cannot be paired is reported as a :class:`Problem`, never guessed at.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from srpu_pipelines.config import DatasetSpec
from srpu_pipelines.data.imageio import IMAGE_EXTENSIONS, is_image_file
from srpu_pipelines.errors import MissingError

SIDECARS = (".txt", ".TXT")  # calibration text files beside their images (data/calibration.py)


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass(frozen=True)
class PoolImage:
    """An unlabelled image; ``id`` is ``dataset/name`` (name: file stem, NFC)."""

    dataset: str
    name: str
    image: Path

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.name}"


@dataclass(frozen=True)
class Pair(PoolImage):
    """An image and its mask."""

    mask: Path


_TILE = re.compile(r"^(?P<parent>.+)__y(?P<y>\d+)_x(?P<x>\d+)$")


def tile_name(name: str, y: int, x: int) -> str:
    """The name of the tile of image ``name`` at (y, x): a selected tile keeps it when its
    corrected mask is labelled (``NAME__y256_x0.tif`` + ``NAME__y256_x0_mask.png``)."""
    return f"{name}__y{y}_x{x}"


def tile_parent(item_id: str) -> tuple[str, int, int] | None:
    """(parent image id, y, x) of a tile id, or None for a whole image."""
    m = _TILE.match(item_id)
    return (m["parent"], int(m["y"]), int(m["x"])) if m else None


def _nfc(s: str) -> str:
    # macOS writes decomposed unicode names; match on the composed form.
    return unicodedata.normalize("NFC", s)


def _list_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def _split_images(folder: Path, problems: list[Problem], what: str) -> dict[str, Path]:
    """Map NFC stem -> image path; report non-images and duplicate stems."""
    by_stem: dict[str, list[Path]] = {}
    files = _list_files(folder)
    image_stems = {q.stem for q in files if is_image_file(q)}
    for p in files:
        if p.suffix in SIDECARS and p.stem in image_stems:
            continue  # an instrument's calibration file beside its image (Hitachi, JEOL)
        if not is_image_file(p):
            problems.append(
                Problem(
                    str(p),
                    f"not an image file in the {what} folder "
                    f"(expected {', '.join(IMAGE_EXTENSIONS)})",
                )
            )
            continue
        by_stem.setdefault(_nfc(p.stem), []).append(p)
    out: dict[str, Path] = {}
    for stem, paths in by_stem.items():
        if len(paths) > 1:
            for p in paths:
                problems.append(
                    Problem(
                        str(p),
                        f"several files share the name {stem!r}: "
                        f"{', '.join(q.name for q in paths)}; keep one",
                    )
                )
            continue
        out[stem] = paths[0]
    return out


def find_labeled(spec: DatasetSpec, suffix: str) -> tuple[list[Pair], list[Problem]]:
    """Pairs of one sub-dataset, plus everything in its folders that does not pair up."""
    problems: list[Problem] = []
    if spec.labeled is None:
        return [], problems
    folder = Path(spec.labeled)
    if not folder.is_dir():
        raise MissingError(f"data.datasets[{spec.name}].labeled: folder {folder} not found")
    files = _split_images(folder, problems, "labelled")
    if spec.masks is not None:
        mask_dir = Path(spec.masks)
        if not mask_dir.is_dir():
            raise MissingError(f"data.datasets[{spec.name}].masks: folder {mask_dir} not found")
        images = files
        masks = {}
        for stem, p in _split_images(mask_dir, problems, "mask").items():
            key = stem[: -len(suffix)] if suffix and stem.endswith(suffix) else stem
            if key in masks:
                problems.append(
                    Problem(
                        str(p), f"two masks for {key!r}: {masks[key].name} and {p.name}; keep one"
                    )
                )
                continue
            masks[key] = p
    else:
        images = {s: p for s, p in files.items() if not (suffix and s.endswith(suffix))}
        masks = {s[: -len(suffix)]: p for s, p in files.items() if suffix and s.endswith(suffix)}
    pairs = []
    for stem in sorted(images):
        if stem in masks:
            pairs.append(Pair(spec.name, stem, images[stem], masks[stem]))
        else:
            problems.append(
                Problem(str(images[stem]), f"image without a mask (expected {stem}{suffix}.<ext>)")
            )
    for stem in sorted(set(masks) - set(images)):
        problems.append(Problem(str(masks[stem]), f"mask without an image (expected {stem}.<ext>)"))
    return pairs, problems


def find_pool(spec: DatasetSpec) -> tuple[list[PoolImage], list[Problem]]:
    problems: list[Problem] = []
    if spec.raw is None:
        return [], problems
    folder = Path(spec.raw)
    if not folder.is_dir():
        raise MissingError(f"data.datasets[{spec.name}].raw: folder {folder} not found")
    imgs = _split_images(folder, problems, "pool")
    return [PoolImage(spec.name, s, p) for s, p in sorted(imgs.items())], problems
