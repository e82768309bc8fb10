"""What an SEM file says about itself: size, bit depth, pages, compression, the
instrument, its pixel size (with where that came from) and, where a tag says it, the
height of the image without its data bar.

Pixel sizes, in nanometres:
- Zeiss (TIFF tag 34118, CZ_SEM): ``ap_image_pixel_size``, checked against
  ``ap_width`` / image width; when they disagree, or the first is missing, the width
  rule is used and the answer says so. ``ap_pixel_size`` is never used: some files
  carry a stale one, from another store resolution.
- FEI / Thermo Fisher (tag 34682): ``Scan.PixelWidth`` (metres); ``Image.ResolutionY``
  is the height of the image above the data bar. Other files: the bar is detected from
  the pixels (``data/databar.py``).
- Hitachi and JEOL: a sidecar text file beside the image (same name, ``.txt``):
  Hitachi's ``PixelSize=`` (nm), JEOL's scale marker (``$$SM_MICRON_MARKER``, a length)
  over its length in pixels (``$$SM_MICRON_BAR``).
Unknown stays unknown (``pixel_size_nm`` None, ``source`` says why): never guessed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from srpu_pipelines.data.databar import detect_bar
from srpu_pipelines.data.discovery import SIDECARS
from srpu_pipelines.data.imageio import (
    ImageReadError,
    _compression_name,
    image_size,
    is_image_file,
    read_raw,
)

# length units as instruments write them, in nm
UNIT_NM = {"pm": 1e-3, "nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "mm": 1e6, "m": 1e9}
AGREE = 0.05  # ap_image_pixel_size and ap_width / width agree within this share


def _nm(value: Any, unit: str) -> float | None:
    scale = UNIT_NM.get(unit.strip().lower())
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v * scale if scale is not None and v > 0 else None


def _zeiss_entry(meta: dict, key: str) -> float | None:
    """A CZ_SEM quantity in nm: tifffile gives (label, value, unit)."""
    entry = meta.get(key)
    if not isinstance(entry, tuple) or len(entry) < 3:
        return None
    return _nm(entry[1], str(entry[2]))


def _zeiss(meta: dict, width: int) -> dict[str, Any]:
    ips = _zeiss_entry(meta, "ap_image_pixel_size")
    field = _zeiss_entry(meta, "ap_width")
    by_width = field / width if field else None
    model = next(
        (str(meta[k][1]) for k in ("dp_sem", "sv_serial_number") if isinstance(meta.get(k), tuple)),
        None,
    )
    out: dict[str, Any] = {"instrument": f"Zeiss {model}" if model else "Zeiss"}
    if ips and by_width:
        off = abs(ips - by_width) / by_width
        if off <= AGREE:
            out.update(
                pixel_size_nm=ips,
                source=f"CZ_SEM ap_image_pixel_size; agrees with ap_width / width "
                f"({by_width:.4g} nm, {off:.1%} apart)",
            )
        else:
            out.update(
                pixel_size_nm=by_width,
                source=f"CZ_SEM ap_width / width ({field:.4g} nm / {width}); "
                f"ap_image_pixel_size ({ips:.4g} nm) is {off:.0%} off it, so not used",
            )
    elif ips:
        out.update(pixel_size_nm=ips, source="CZ_SEM ap_image_pixel_size (no ap_width to check)")
    elif by_width:
        out.update(
            pixel_size_nm=by_width,
            source=f"CZ_SEM ap_width / width ({field:.4g} nm / {width}); no "
            "ap_image_pixel_size (ap_pixel_size is never used: it can be stale)",
        )
    else:
        out.update(source="CZ_SEM tags without ap_image_pixel_size or ap_width")
    return out


def _fei(meta: dict, height: int) -> dict[str, Any]:
    scan, image, system = (meta.get(k) or {} for k in ("Scan", "Image", "System"))
    kind = str(system.get("SystemType", "")).strip().strip('"')
    out: dict[str, Any] = {"instrument": f"FEI/Thermo {kind}".strip()}
    px = _nm(scan.get("PixelWidth"), "m")
    out["source"] = "FEI Scan.PixelWidth" if px else "FEI tags without Scan.PixelWidth"
    if px:
        out["pixel_size_nm"] = px
    res_y = image.get("ResolutionY")
    if isinstance(res_y, int) and 0 < res_y < height:
        out["height_without_bar"] = res_y
        out["bar_source"] = "FEI Image.ResolutionY"
    return out


def _sidecar(path: Path) -> dict[str, Any] | None:
    for ext in SIDECARS:
        side = path.with_suffix(ext)
        if side.is_file() and side != path:
            break
    else:
        return None
    try:
        text = side.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ImageReadError(f"{side}: sidecar calibration file unreadable ({e})") from None
    m = re.search(r"^\s*PixelSize\s*=\s*([0-9.eE+-]+)", text, re.M)
    if m:  # Hitachi (or a tile SRPU cut for labelling): nm per pixel
        name = re.search(r"^\s*InstructName\s*=\s*(.+)$", text, re.M)
        parent = re.search(r"^\s*SrpuTileOf\s*=\s*(.+)$", text, re.M)
        px = _nm(m.group(1), "nm")
        kind = f"a tile of {parent.group(1).strip()}" if parent else "Hitachi"
        return {
            "instrument": f"Hitachi {name.group(1).strip()}" if name else kind,
            "pixel_size_nm": px,
            "source": f"{side.name} PixelSize ({kind}, nm)"
            if px
            else f"{side.name}: PixelSize {m.group(1)!r} is not a positive number",
        }
    bar = re.search(r"^\s*\$\$SM_MICRON_BAR\s+([0-9.]+)", text, re.M)
    marker = re.search(r"^\s*\$\$SM_MICRON_MARKER\s+([0-9.]+)\s*([a-zµμ]+)", text, re.M | re.I)
    if bar or marker or "$CM_FORMAT" in text:  # JEOL
        px = None
        if bar and marker:
            length = _nm(marker.group(1), marker.group(2))
            px = length / float(bar.group(1)) if length and float(bar.group(1)) > 0 else None
        return {
            "instrument": "JEOL",
            "pixel_size_nm": px,
            "source": f"{side.name} $$SM_MICRON_MARKER / $$SM_MICRON_BAR (JEOL)"
            if px
            else f"{side.name}: JEOL sidecar without a usable scale marker and bar length",
        }
    return None


def _tags(tf: Any, h: int, w: int) -> dict[str, Any]:
    """The instrument's calibration tags; tags that do not parse leave the pixel size
    unknown, with the reason (the image itself is still readable)."""
    try:
        if tf.sem_metadata:
            return _zeiss(tf.sem_metadata, w)
        if tf.fei_metadata:
            return _fei(tf.fei_metadata, h)
    except Exception as e:  # a malformed vendor tag: unknown, said why, not a bad image
        return {"source": f"instrument tags unreadable ({type(e).__name__}: {e})"}
    return {}


def inspect_file(path: str | Path, bar: bool = True) -> dict[str, Any]:
    """One file's description (``srpu inspect``): see the module doc. ``bar`` False:
    tags and sidecar only, no pixels decoded (what the index needs beside its own read)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    if not is_image_file(path):
        raise ImageReadError(f"{path}: not an image file")
    out: dict[str, Any] = {"path": str(path), "pixel_size_nm": None, "instrument": None}
    found: dict[str, Any] = {}
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        try:
            with tifffile.TiffFile(path) as tf:
                page = tf.pages.first
                h, w = int(page.imagelength), int(page.imagewidth)
                bits = page.bitspersample
                out.update(
                    height=h,
                    width=w,
                    pages=len(tf.pages),
                    bit_depth=int(max(bits) if isinstance(bits, tuple) else bits),
                    samples=int(page.samplesperpixel),
                    compression=_compression_name(page.compression),
                    tiled=bool(page.is_tiled),
                    bigtiff=bool(tf.is_bigtiff),
                )
                found = _tags(tf, h, w)
        except Exception as e:  # tifffile raises many types; re-raised with the file name
            raise ImageReadError(f"{path}: not a readable TIFF ({type(e).__name__}: {e})") from None
    else:
        h, w = image_size(path)
        out.update(height=h, width=w, pages=1)
    if not found.get("pixel_size_nm"):
        side = _sidecar(path)
        if side:
            found = {**found, **side} if side.get("pixel_size_nm") else {**side, **found}
    out.update(found)
    out.setdefault("source", "no calibration tag or sidecar file: pixel size unknown")
    out["pixel_size_source"] = out.pop("source")
    if out.get("height_without_bar"):
        out["data_bar_rows"] = out["height"] - out.pop("height_without_bar")
        out["data_bar_source"] = out.pop("bar_source")
    elif bar:
        found_bar = detect_bar(read_raw(path))
        out["data_bar_rows"] = found_bar["rows"]
        out["data_bar_source"] = f"detected: {found_bar['why']}"
    return out


def calibrate(
    path: str | Path,
    grey: Any,
    pixel_size_nm: float | None = None,
    data_bar: str | int = "auto",
    where: str = "data_bar",
) -> dict[str, Any]:
    """Pixel size and data bar of one image whose pixels ``grey`` are already decoded:
    ``pixel_size_nm`` (a params override) wins over the file's tags and sidecar; the bar
    is ``data_bar`` when that is ``none`` or a number of rows (``where`` names the key in
    the answer's source), else the FEI tag, else detected from ``grey``."""
    info = inspect_file(path, bar=False)
    if pixel_size_nm is not None:
        nm, source = pixel_size_nm, f"params {where.rsplit('.', 1)[0]}.pixel_size_nm"
    else:
        nm, source = info["pixel_size_nm"], info["pixel_size_source"]
    out: dict[str, Any] = {"pixel_size_nm": nm, "pixel_size_source": source}
    if data_bar == "none":
        return {**out, "data_bar_rows": 0, "data_bar_source": f"params {where}: none"}
    if isinstance(data_bar, int):
        return {**out, "data_bar_rows": data_bar, "data_bar_source": f"params {where}: {data_bar}"}
    if "data_bar_rows" in info:
        return {
            **out,
            "data_bar_rows": int(info["data_bar_rows"]),
            "data_bar_source": info["data_bar_source"],
        }
    found = detect_bar(grey)
    return {**out, "data_bar_rows": found["rows"], "data_bar_source": f"detected: {found['why']}"}
