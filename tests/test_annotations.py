"""labelme JSON and ImageJ ROI sets in and out: the same mask after a round trip."""

import json

import numpy as np
import pytest
from PIL import Image

from srpu_pipelines.cli import main
from srpu_pipelines.data.annotations import (
    AnnotationError,
    imagej_to_mask,
    labelme_to_mask,
    mask_to_imagej,
    mask_to_labelme,
    write_imagej_zip,
)

NAMES = ["matrix", "pore", "crack"]


def painted() -> np.ndarray:
    """Discs, a hole holding another class, a 3 px diagonal crack, 1- and 2-pixel specks."""
    yy, xx = np.mgrid[:96, :128]
    m = np.zeros((96, 128), np.uint8)
    m[(yy - 40) ** 2 + (xx - 40) ** 2 <= 20**2] = 1
    m[(yy - 40) ** 2 + (xx - 40) ** 2 <= 6**2] = 0  # a hole, matrix inside
    m[70:90, 80:120] = 1
    m[np.abs(yy - xx + 20) <= 1] = 2
    m[10, 100] = 1
    m[12:14, 110] = 1
    return m


def test_labelme_round_trip(tmp_path):
    m = painted()
    doc = mask_to_labelme(m, NAMES, "img.png")
    (tmp_path / "img.json").write_text(json.dumps(doc))
    back, _ = labelme_to_mask(tmp_path / "img.json", NAMES)
    assert np.array_equal(back, m)


def test_imagej_roi_zip_round_trip(tmp_path):
    m = painted()
    rois = mask_to_imagej(m, NAMES)
    write_imagej_zip(rois, tmp_path / "img.zip")
    assert np.array_equal(imagej_to_mask(tmp_path / "img.zip", NAMES, m.shape), m)
    assert {r.name.split("-")[0] for r in rois} == set(NAMES)


def test_labelme_shapes_paint_in_order_and_uncovered_pixels_are_unlabelled(tmp_path):
    doc = {
        "imageHeight": 20,
        "imageWidth": 30,
        "shapes": [
            {"label": "pore", "shape_type": "rectangle", "points": [[2, 2], [11, 9]]},
            {"label": "Crack 2", "shape_type": "polygon", "points": [[5, 5], [8, 5], [8, 8]]},
            {"label": "pore-b", "shape_type": "circle", "points": [[20, 10], [23, 10]]},
        ],
    }
    (tmp_path / "a.json").write_text(json.dumps(doc))
    m, _ = labelme_to_mask(tmp_path / "a.json", NAMES)
    assert (m[2:10, 2:12][m[2:10, 2:12] != 2] == 1).all() and m[6, 7] == 2  # crack on top
    assert m[10, 20] == 1 and m[10, 24] == 255 and m[0, 0] == 255
    m2, _ = labelme_to_mask(tmp_path / "a.json", NAMES, background="matrix")
    assert m2[0, 0] == 0


def test_an_unknown_label_or_a_line_is_refused_with_the_file_named(tmp_path):
    doc = {"imageHeight": 5, "imageWidth": 5, "shapes": [{"label": "dust", "points": [[0, 0]] * 3}]}
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match=r"b\.json shape 0: label 'dust' names no class"):
        labelme_to_mask(tmp_path / "b.json", NAMES)
    doc["shapes"] = [{"label": "crack", "shape_type": "line", "points": [[0, 0], [4, 4]]}]
    (tmp_path / "b.json").write_text(json.dumps(doc))
    with pytest.raises(AnnotationError, match="is not an area"):
        labelme_to_mask(tmp_path / "b.json", NAMES)
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(AnnotationError, match="not a labelme JSON"):
        labelme_to_mask(tmp_path / "c.json", NAMES)


def test_imagej_rectangles_cover_the_pixels_imagej_does(tmp_path):
    import roifile

    roi = roifile.ImagejRoi(
        roitype=roifile.ROI_TYPE.RECT, left=3, top=2, right=9, bottom=6, name="pore-1"
    )
    roi.tofile(tmp_path / "r.roi")
    m = imagej_to_mask(tmp_path / "r.roi", NAMES, (10, 12))
    assert (m == 1).sum() == 6 * 4 and m[2, 3] == 1 and m[5, 8] == 1 and m[6, 9] == 255


def test_import_masks_cli_writes_beside_the_image_and_never_overwrites(tmp_path, capsys):
    import yaml

    from tests.conftest import tiny_params_dict

    d = tiny_params_dict(tmp_path)
    colours = [[0, 0, 255], [255, 0, 0], [0, 255, 0]]
    d["classes"] = [{"name": n, "color": c} for n, c in zip(NAMES, colours, strict=True)]
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(d))
    m = painted()
    Image.fromarray(np.full(m.shape, 100, np.uint8)).save(tmp_path / "img.png")
    (tmp_path / "img.json").write_text(json.dumps(mask_to_labelme(m, NAMES, "img.png")))
    write_imagej_zip(mask_to_imagej(m, NAMES), tmp_path / "img2.zip")
    Image.fromarray(np.full(m.shape, 100, np.uint8)).save(tmp_path / "img2.tif")
    args = ["-q", "--params", str(tmp_path / "p.yaml"), "import-masks"]
    assert main([*args, str(tmp_path / "img.json"), str(tmp_path / "img2.zip")]) == 0
    lut = np.array([[0, 0, 255], [255, 0, 0], [0, 255, 0]], np.uint8)
    for stem in ("img", "img2"):
        got = np.array(Image.open(tmp_path / f"{stem}_mask.png").convert("RGB"))
        assert np.array_equal(got, lut[m])
    before = (tmp_path / "img_mask.png").read_bytes()
    assert main([*args, str(tmp_path / "img.json")]) == 1
    assert "is not overwritten" in capsys.readouterr().err
    assert (tmp_path / "img_mask.png").read_bytes() == before
