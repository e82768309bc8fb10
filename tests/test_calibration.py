"""Pixel size and instrument from real SEM TIFFs (the values their README says are right)
and from constructed Hitachi and JEOL sidecar files; ``srpu inspect``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from srpu_pipelines.cli import main
from srpu_pipelines.data.calibration import inspect_file
from srpu_pipelines.data.databar import detect_bar
from srpu_pipelines.data.imageio import read_raw

SEM = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "sem-metadata").resolve()
real = pytest.mark.skipif(
    not SEM.is_dir(), reason=f"{SEM} absent: the real instrument TIFFs are not on this machine"
)


@real
@pytest.mark.parametrize(
    "name, first_bar_row",
    [
        ("test_tiff_Zeiss_SEM_1k.tif", 690),  # the README: rows ~690-767
        ("test_tiff_Zeiss_SEM_512pix.tif", 350),  # ~350-383
        ("ZEISS_SEM_multipage.tif", None),  # no bar
        ("FEI-Helios-Ebeam-8bits.tif", 442),  # 442-470 (the tag)
    ],
)
def test_data_bar_rows_of_real_instrument_tiffs(name, first_bar_row):
    info = inspect_file(SEM / name)
    want = 0 if first_bar_row is None else info["height"] - first_bar_row
    assert abs(info["data_bar_rows"] - want) <= 5, info["data_bar_source"]


@pytest.mark.parametrize(
    "folder", ["nasa-super/labeled", "nasa-super/different_test", "nasa-ebc/labeled"]
)
def test_no_bar_on_micrographs_without_one(folder):
    """nasa-ebc's dark substrate at the bottom is sample: one tone, no lettering."""
    root = SEM.parent / folder
    if not root.is_dir():
        pytest.skip(f"{root} absent: the real data set is not on this machine")
    images = [f for f in sorted(root.glob("*.tif")) if not f.stem.endswith("_mask")]
    assert images
    for f in images:
        bar = detect_bar(read_raw(f))
        assert bar["rows"] == 0, (f.name, bar["why"])


def test_bar_detection_on_constructed_images():
    rng = np.random.default_rng(0)
    sample = rng.normal(0.5, 0.12, (300, 400)).clip(0.1, 0.9)
    img = sample.copy()
    img[260:] = 1.0  # a white bar ...
    img[270:290, 20:200:6] = 0.0  # ... with lettering
    img[295:297, 250:380] = 0.0  # and a scale bar
    assert detect_bar(img)["rows"] == 40
    substrate = sample.copy()
    substrate[230:] = 0.02  # a dark, uniform substrate: sample
    assert detect_bar(substrate)["rows"] == 0
    assert detect_bar(np.zeros((100, 100)))["rows"] == 0  # one colour throughout
    assert detect_bar(sample)["rows"] == 0


@real
@pytest.mark.parametrize(
    "name, nm, source, instrument",
    [
        ("test_tiff_Zeiss_SEM_1k.tif", 2615.0, "ap_image_pixel_size", "Zeiss Merlin"),
        # ap_pixel_size (5.825 nm) is stale here: ap_width 5.965 um / 512 px is right
        ("test_tiff_Zeiss_SEM_512pix.tif", 5965.0 / 512, "ap_width / width", "Zeiss ULTRA 55"),
        ("ZEISS_SEM_multipage.tif", 12.33, "ap_image_pixel_size", "Zeiss Auriga 60"),
        ("FEI-Helios-Ebeam-8bits.tif", 3372.4, "Scan.PixelWidth", "FEI/Thermo Helios"),
        ("FEI-Helios-Ebeam-16bits.tif", 3372.4, "Scan.PixelWidth", "FEI/Thermo Helios"),
    ],
)
def test_real_instrument_tiffs(name, nm, source, instrument):
    info = inspect_file(SEM / name)
    assert info["pixel_size_nm"] == pytest.approx(nm, rel=1e-3)
    assert source in info["pixel_size_source"]
    assert info["instrument"].startswith(instrument)
    if name.startswith("FEI"):
        assert info["height"] == 471 and info["data_bar_rows"] == 471 - 442
        assert "ResolutionY" in info["data_bar_source"]
        assert info["bit_depth"] == (16 if "16" in name else 8)
    if name.startswith("ZEISS_SEM_multipage"):
        assert info["pages"] == 2 and info["width"] == 2048


def test_sidecars_and_unknown(tmp_path):
    img = np.zeros((96, 128), np.uint8)
    hit = tmp_path / "hitachi 01.tif"
    tifffile.imwrite(hit, img, compression="lzw")
    hit.with_suffix(".txt").write_text(
        "[SemImageFile]\nInstructName=S-4800\nDataSize=1280x960\nPixelSize=2.48047\n"
    )
    info = inspect_file(hit)
    assert info["pixel_size_nm"] == pytest.approx(2.48047)
    assert info["instrument"] == "Hitachi S-4800" and "PixelSize" in info["pixel_size_source"]
    assert info["compression"] == "LZW"
    jeol = tmp_path / "jeol.tif"
    tifffile.imwrite(jeol, img)
    jeol.with_suffix(".txt").write_text(
        "$CM_FORMAT JEOL/SEM\n$CM_MAG 5000\n$$SM_MICRON_BAR 120\n$$SM_MICRON_MARKER 5um\n"
    )
    j = inspect_file(jeol)
    assert j["pixel_size_nm"] == pytest.approx(5000 / 120) and j["instrument"] == "JEOL"
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, img)
    p = inspect_file(plain)
    assert p["pixel_size_nm"] is None and "unknown" in p["pixel_size_source"]
    assert (p["height"], p["width"], p["bit_depth"], p["pages"]) == (96, 128, 8, 1)


def test_inspect_cli_one_json_per_file_without_params(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no params.yaml here: inspect needs none
    good = tmp_path / "a.tif"
    tifffile.imwrite(good, np.zeros((8, 8), np.uint8), compression="zlib")
    bad = tmp_path / "b.tif"
    bad.write_bytes(b"II*\x00garbage")
    assert main(["inspect", str(good), str(bad)]) == 1
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["path"] == str(good) and lines[0]["compression"] == "ADOBE_DEFLATE"
    assert "b.tif" in lines[1]["error"]


def test_a_tile_cut_for_labelling_carries_its_parents_pixel_size(tmp_path):
    from srpu_pipelines.active_learning.rounds import _write_image

    src = tmp_path / "pool" / "big.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    item = {"image": str(src), "name": "big__t8_16", "box": [8, 16, 32, 24], "pixel_size_nm": 12.5}
    dest = _write_image(item, tmp_path / "round")
    info = inspect_file(dest)
    assert info["pixel_size_nm"] == 12.5 and "a tile of big.tif" in info["pixel_size_source"]
    assert (info["height"], info["width"]) == (32, 24)
    item = {**item, "name": "plain", "pixel_size_nm": None}
    assert not _write_image(item, tmp_path / "round").with_suffix(".txt").exists()
