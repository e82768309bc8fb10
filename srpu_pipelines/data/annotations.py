"""Masks from the annotation tools people use: labelme JSON and ImageJ / Fiji ROI sets.

- **labelme** (``NAME.json``): ``shapes`` of ``shape_type`` polygon, rectangle or circle,
  each with a ``label``, painted in file order (later shapes over earlier, as labelme
  does). Polygons are rasterised as labelme's own ``shape_to_mask`` does (PIL, outline
  included), so a mask made here matches the one labelme would export. The JSON is read
  directly: neither labelme nor its GUI dependencies are needed.
- **ImageJ ROI sets** (``.roi`` or a ``.zip`` of them, as the ROI Manager saves; read with
  roifile): polygon, freehand, traced and rectangle/oval ROIs; a pixel belongs to a ROI
  when its centre lies inside, as in ImageJ. A ROI's class is the class name its name
  starts with ("crack", "crack-0003", "Crack 2"), the longest match winning.

Pixels no shape covers become ``background`` (a class name), else 'not labelled'
(``IGNORE_INDEX``). The opposite direction (a mask to shapes) is here too, so a
prediction can be corrected in either tool and read back.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from srpu_pipelines.config import IGNORE_INDEX
from srpu_pipelines.errors import UserError


class AnnotationError(UserError, ValueError):
    """An annotation file that cannot be turned into a mask; the message names it."""


def _class_of(name: str, names: list[str], where: str) -> int:
    low = name.strip().lower()
    hits = [
        k
        for k, n in enumerate(names)
        if low == n.lower() or re.match(re.escape(n.lower()) + r"(?![a-z])", low)
    ]
    if not hits:
        raise AnnotationError(
            f"{where}: label {name!r} names no class (classes: {', '.join(names)}); "
            "rename it to start with a class name"
        )
    return max(hits, key=lambda k: len(names[k]))


def _blank(shape: tuple[int, int], names: list[str], background: str | None) -> np.ndarray:
    fill = IGNORE_INDEX if background is None else _class_of(background, names, "background")
    return np.full(shape, fill, np.uint8)


# -- labelme -------------------------------------------------------------------------------
def _labelme_shape(shape: dict[str, Any], size: tuple[int, int], where: str) -> np.ndarray:
    """Boolean (H, W) of one labelme shape, rasterised as labelme does."""
    h, w = size
    im = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(im)
    pts = [tuple(map(float, p)) for p in shape.get("points", [])]
    kind = shape.get("shape_type") or "polygon"
    if kind == "polygon" and len(pts) >= 3:
        draw.polygon(pts, outline=1, fill=1)
    elif kind == "rectangle" and len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        draw.rectangle([min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=1, fill=1)
    elif kind == "circle" and len(pts) == 2:
        (cx, cy), (px, py) = pts
        r = math.hypot(px - cx, py - cy)
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=1, fill=1)
    else:
        raise AnnotationError(
            f"{where}: shape {shape.get('label')!r} of type {kind!r} with {len(pts)} points "
            "is not an area (polygon, rectangle or circle)"
        )
    return np.asarray(im, bool)


def labelme_to_mask(
    path: str | Path, names: list[str], background: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """(uint8 class-index mask, the JSON) of a labelme file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        h, w = int(doc["imageHeight"]), int(doc["imageWidth"])
        shapes = doc["shapes"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AnnotationError(
            f"{path}: not a labelme JSON file ({type(e).__name__}: {e})"
        ) from None
    mask = _blank((h, w), names, background)
    for i, sh in enumerate(shapes):
        where = f"{path} shape {i}"
        k = _class_of(str(sh.get("label", "")), names, where)
        mask[_labelme_shape(sh, (h, w), where)] = k
    return mask, doc


def _components_by_area(mask: np.ndarray, num_classes: int) -> list[tuple[int, np.ndarray]]:
    """(class, boolean component) of every labelled region, the largest first: painting
    in that order rebuilds the mask, each hole's content painted after what surrounds it."""
    from skimage.measure import label

    comps = []
    for k in range(num_classes):
        lab, n = label(mask == k, connectivity=2, return_num=True)
        for j in range(1, n + 1):
            comps.append((k, lab == j))
    comps.sort(key=lambda kc: -int(kc[1].sum()))
    return comps


def mask_to_labelme(mask: np.ndarray, names: list[str], image_path: str) -> dict[str, Any]:
    """A labelme document whose polygons rebuild ``mask`` (outer boundary pixels of each
    region, painted largest first); 'not labelled' pixels get no shape."""
    import cv2

    shapes = []
    for k, comp in _components_by_area(mask, len(names)):
        cs, _ = cv2.findContours(comp.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for c in cs:
            pts = c[:, 0, :].astype(float).tolist()
            while len(pts) < 3:  # a 1- or 2-pixel region: its pixels as a closed outline
                pts.append(pts[0])
            shapes.append(
                {
                    "label": names[k],
                    "points": pts,
                    "group_id": None,
                    "shape_type": "polygon",
                    "flags": {},
                }
            )
    return {
        "version": "5.5.0",
        "flags": {},
        "shapes": shapes,
        "imagePath": image_path,
        "imageData": None,
        "imageHeight": int(mask.shape[0]),
        "imageWidth": int(mask.shape[1]),
    }


# -- ImageJ ROI sets -------------------------------------------------------------------------
def _inside_centres(poly: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre (x + 0.5, y + 0.5) lies inside the polygon (x, y), as ImageJ."""
    from matplotlib.path import Path as MplPath

    h, w = size
    out = np.zeros((h, w), bool)
    if len(poly) < 3:
        return out
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return out
    yy, xx = np.mgrid[y0:y1, x0:x1]
    pts = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], 1)
    inside = MplPath(poly).contains_points(pts).reshape(yy.shape)
    out[y0:y1, x0:x1] = inside
    return out


def _read_rois(path: Path) -> list[Any]:
    import roifile

    try:
        rois = roifile.roiread(path)
    except Exception as e:  # roifile raises many types on a damaged file; named here
        raise AnnotationError(
            f"{path}: not a readable ImageJ ROI file ({type(e).__name__}: {e})"
        ) from None
    return rois if isinstance(rois, list) else [rois]


def imagej_to_mask(
    path: str | Path,
    names: list[str],
    size: tuple[int, int],
    background: str | None = None,
) -> np.ndarray:
    """uint8 class-index mask (``size`` = (H, W), the image's) of an ImageJ ROI set."""
    import roifile

    path = Path(path)
    h, w = size
    mask = _blank((h, w), names, background)
    for i, roi in enumerate(_read_rois(path)):
        where = f"{path} ROI {i} ({roi.name!r})"
        k = _class_of(roi.name or "", names, where)
        if roi.roitype == roifile.ROI_TYPE.RECT and not roi.subpixelresolution:
            sel = np.zeros((h, w), bool)
            sel[max(roi.top, 0) : roi.bottom, max(roi.left, 0) : roi.right] = True
        elif roi.roitype in (roifile.ROI_TYPE.LINE, roifile.ROI_TYPE.POINT) or (
            roi.roitype
            in (roifile.ROI_TYPE.POLYLINE, roifile.ROI_TYPE.FREELINE, roifile.ROI_TYPE.ANGLE)
        ):
            raise AnnotationError(f"{where}: a {roi.roitype.name.lower()} ROI encloses no area")
        else:
            sel = np.zeros((h, w), bool)
            for poly in roi.coordinates(multi=True):
                sel ^= _inside_centres(np.asarray(poly, np.float64), (h, w))
        mask[sel] = k
    return mask


def mask_to_imagej(mask: np.ndarray, names: list[str]) -> list[Any]:
    """ImageJ polygon ROIs (``roifile.ImagejRoi``) that rebuild ``mask``, largest first,
    each named ``CLASS-NNNN``: boundaries through the edge midpoints of each region's
    border pixels, so ImageJ's centre rule gives back the same pixels."""
    import roifile
    from skimage.measure import find_contours

    rois = []
    for n, (k, comp) in enumerate(_components_by_area(mask, len(names))):
        padded = np.pad(comp.astype(np.float64), 1)
        for c in find_contours(padded, 0.5):
            if len(c) < 3:
                continue
            xy = np.stack([c[:, 1] - 1 + 0.5, c[:, 0] - 1 + 0.5], 1)  # ImageJ: centres at +0.5
            # skimage's contours of a solid region circle it; the outer one is the longest
            rois.append((k, n, xy, len(c)))
    out = []
    seen: set[int] = set()
    for k, n, xy, _ in sorted(rois, key=lambda r: (r[1], -r[3])):
        if n in seen:
            continue  # holes are refilled by the regions inside them, painted later
        seen.add(n)
        roi = roifile.ImagejRoi.frompoints(xy)
        roi.name = f"{names[k]}-{n:04d}"
        out.append(roi)
    return out


def write_imagej_zip(rois: list[Any], path: str | Path) -> None:
    """The ROI Manager's zip of ``rois`` (written to a temp name, then renamed)."""
    from srpu_pipelines.io.files import atomic_write_with

    def write(tmp: str) -> None:
        for roi in rois:
            roi.tofile(tmp, name=roi.name)

    atomic_write_with(Path(path), write)


# -- srpu import-masks -----------------------------------------------------------------------
def _image_beside(path: Path, hint: str | None) -> Path:
    from srpu_pipelines.data.imageio import IMAGE_EXTENSIONS

    if hint:
        img = (path.parent / hint).resolve()
        if img.is_file():
            return img
    for ext in IMAGE_EXTENSIONS:
        for cand in (path.with_suffix(ext), path.with_suffix(ext.upper())):
            if cand.is_file():
                return cand
    raise AnnotationError(
        f"{path}: no image found beside it (imagePath {hint!r}, or {path.stem}.tif/.png/...): "
        "the mask needs the image's size and name"
    )


def import_annotation(
    path: str | Path,
    codec: Any,
    names: list[str],
    suffix: str,
    background: str | None = None,
    out_dir: str | Path | None = None,
) -> tuple[Path, np.ndarray]:
    """Write the mask of a labelme JSON or ImageJ ROI set as ``IMAGE{suffix}.png`` beside
    its image (or in ``out_dir``), in the params' mask encoding. An existing mask is never
    overwritten: that is a label someone made."""
    from srpu_pipelines.data.imageio import image_size
    from srpu_pipelines.data.masks import MaskCodec
    from srpu_pipelines.io.files import atomic_write_with

    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"{path}: file not found")
    if path.suffix.lower() == ".json":
        doc = json.loads(path.read_text(encoding="utf-8")) if path.stat().st_size else {}
        image = _image_beside(path, doc.get("imagePath") if isinstance(doc, dict) else None)
        mask, doc = labelme_to_mask(path, names, background)
        h, w = image_size(image)
        if (h, w) != mask.shape:
            raise AnnotationError(
                f"{path}: imageHeight x imageWidth {mask.shape[0]}x{mask.shape[1]} differ from "
                f"{image.name} ({h}x{w})"
            )
    elif path.suffix.lower() in (".roi", ".zip"):
        image = _image_beside(path, None)
        mask = imagej_to_mask(path, names, image_size(image), background)
    else:
        raise AnnotationError(f"{path}: not a labelme .json or ImageJ .roi/.zip file")
    assert isinstance(codec, MaskCodec)
    if (mask == IGNORE_INDEX).any() and codec.encoding == "color" and codec.ignore_color is None:
        n = int((mask == IGNORE_INDEX).sum())
        raise AnnotationError(
            f"{path}: {n} pixels lie in no shape; name their class with --background CLASS, "
            "or set mask.ignore_color so they can stay unlabelled"
        )
    dest = Path(out_dir or image.parent) / f"{image.stem}{suffix}.png"
    if dest.exists():
        raise AnnotationError(f"{dest} exists: it is not overwritten (move it away first)")
    arr = codec.to_color(mask) if codec.encoding == "color" else mask
    if codec.encoding == "grey":
        lut = np.full(256, 0, np.uint8)
        lut[: len(codec.grey_levels or ())] = codec.grey_levels
        arr = lut[mask]
    atomic_write_with(dest, lambda tmp: Image.fromarray(arr).save(tmp, format="PNG"))
    return dest, mask
