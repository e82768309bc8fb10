"""Decoding masks: colour (with a default class), index, grey levels, ignore colour."""

import numpy as np
import pytest
from PIL import Image

from srpu_pipelines.config import IGNORE_INDEX
from srpu_pipelines.data.masks import MaskCodec, MaskDecodeError, class_fractions
from tests.conftest import COLORS, color_mask, save

IDX = np.array([[0, 1, 2, 1], [2, 2, 0, 0]], np.uint8)


def codec(**kw):
    base = dict(encoding="color", colors=tuple(COLORS))
    base.update(kw)
    return MaskCodec(**base)


def test_colour_round_trip(tmp_path):
    c = codec()
    assert np.array_equal(c.decode_file(save(tmp_path / "m.png", c.to_color(IDX))), IDX)


def test_painted_mask_with_default_class(tmp_path):
    """nasa-super style: the micrograph with phases painted over it in pure colours."""
    rgb = np.full((2, 4, 3), 0, np.uint8)
    rgb[..., :] = np.array([[[90], [91], [92], [93]], [[94], [95], [96], [97]]], np.uint8)  # grey
    rgb[0, 1] = (0, 0, 255)
    rgb[1, 2] = (255, 0, 0)
    rgba = np.dstack([rgb, np.full((2, 4), 255, np.uint8)])
    c = MaskCodec("color", ((0, 0, 0), (0, 0, 255), (255, 0, 0)), default_class=0)
    out = c.decode_file(save(tmp_path / "paint_mask.tif", rgba))
    assert out.tolist() == [[0, 1, 0, 0], [0, 0, 2, 0]]


def test_unknown_colours_without_default_name_the_file(tmp_path):
    rgb = color_mask(IDX)
    rgb[0, 0] = (12, 34, 56)
    with pytest.raises(
        MaskDecodeError, match=r"bad_mask\.png: 1 pixels .* match no class .*\(12, 34, 56\)"
    ):
        codec().decode_file(save(tmp_path / "bad_mask.png", rgb))


def test_ignore_colour(tmp_path):
    rgb = color_mask(IDX)
    rgb[1, 3] = (255, 255, 255)
    out = codec(ignore_color=(255, 255, 255)).decode_file(save(tmp_path / "m.png", rgb))
    assert out[1, 3] == IGNORE_INDEX and out[0, 0] == 0
    assert class_fractions(out, 3) == pytest.approx([2 / 7, 2 / 7, 3 / 7])


def test_index_mask_and_palette_index(tmp_path):
    c = codec(encoding="index")
    assert np.array_equal(c.decode_file(save(tmp_path / "i.png", IDX)), IDX)
    im = Image.fromarray(IDX, mode="L").convert("P")
    im.putpalette([10, 10, 10, 200, 0, 0, 0, 0, 200] + [0] * (256 * 3 - 9))
    im.save(tmp_path / "p.png")
    assert np.array_equal(c.decode_file(tmp_path / "p.png"), IDX)
    with pytest.raises(MaskDecodeError, match=r"values \[7\]"):
        c.decode_file(save(tmp_path / "bad.png", np.where(IDX == 2, 7, IDX).astype(np.uint8)))
    with pytest.raises(MaskDecodeError, match="encoding: color"):
        c.decode_file(save(tmp_path / "col.png", color_mask(IDX)))


def test_grey_level_map(tmp_path):
    c = MaskCodec("grey", ((0, 0, 0), (255, 255, 255)), grey_levels=(0, 255))
    m = np.array([[0, 255], [255, 0]], np.uint8)
    assert c.decode_file(save(tmp_path / "g.png", m)).tolist() == [[0, 1], [1, 0]]
    with pytest.raises(MaskDecodeError, match="match no class"):
        c.decode_file(save(tmp_path / "g2.png", np.array([[0, 128]], np.uint8)))


def test_16bit_painted_mask(tmp_path):
    """Some real masks are 16-bit RGBA TIFFs: pure colours are 0 / 65535 there."""
    import tifffile

    rgba = np.full((2, 3, 4), 65535, np.uint16)
    rgba[..., :3] = 13908  # grey micrograph pixel, not a multiple of 257
    rgba[0, 0, :3] = (0, 0, 65535)
    rgba[1, 2, :3] = (65535, 0, 0)
    tifffile.imwrite(tmp_path / "m16.tif", rgba, photometric="rgb", extrasamples=[2])
    c = MaskCodec("color", ((0, 0, 0), (0, 0, 255), (255, 0, 0)), default_class=0)
    assert c.decode_file(tmp_path / "m16.tif").tolist() == [[1, 0, 0], [0, 0, 2]]


def test_bilevel_masks_as_index_and_grey(tmp_path):
    m = np.array([[0, 1], [1, 0]], bool)
    Image.fromarray(m).save(tmp_path / "b.png")
    Image.fromarray(m).save(tmp_path / "b.tif")  # tifffile reads it (1-bit, min-is-black)
    for name in ("b.png", "b.tif"):
        idx = MaskCodec("index", ((0, 0, 0), (255, 255, 255))).decode_file(tmp_path / name)
        assert idx.tolist() == [[0, 1], [1, 0]], name
        grey = MaskCodec("grey", ((0, 0, 0), (255, 255, 255)), grey_levels=(0, 255))
        assert grey.decode_file(tmp_path / name).tolist() == [[0, 1], [1, 0]], name


def test_anti_aliased_edges_snap_and_are_counted(tmp_path):
    """A 2-px brush edge of (0, 0, 200) beside pure blue is blue; a JPEG-ish smear of red
    is red; a colour far from every class still goes to the default class (or errors)."""
    rgb = color_mask(IDX)  # red, blue, green
    rgb[0, 1] = (0, 0, 200)  # blue, anti-aliased
    rgb[1, 2] = (230, 20, 10)  # red, smeared
    c = codec(color_tolerance=64)
    out, snapped = c.decode_file_counted(save(tmp_path / "aa_mask.png", rgb))
    assert np.array_equal(out, IDX) and snapped == 2
    exact = codec()  # tolerance 0: exact colours only
    with pytest.raises(MaskDecodeError, match="2 pixels"):
        exact.decode_file(save(tmp_path / "aa2_mask.png", rgb))
    near_white = color_mask(IDX)
    near_white[1, 3] = (240, 240, 250)
    out = codec(color_tolerance=64, ignore_color=(255, 255, 255)).decode_array(near_white)
    assert out[1, 3] == IGNORE_INDEX
    # painted over the micrograph (a default class): its neutral greys are unpainted
    # pixels, never snapped to a grey or black class colour nor counted
    c = MaskCodec(
        "color",
        ((0, 0, 0), (0, 0, 255)),
        default_class=1,
        ignore_color=(255, 255, 255),
        color_tolerance=64,
    )
    painted = np.zeros((1, 4, 3), np.uint8)
    painted[0] = [(30, 30, 30), (240, 240, 240), (0, 0, 210), (0, 0, 0)]
    out, snapped = c.decode_array_counted(painted)
    assert out.tolist() == [[1, 1, 1, 0]] and snapped == 1


def test_a_colour_near_two_classes_is_an_error(tmp_path):
    c = MaskCodec("color", ((0, 0, 0), (60, 60, 60)), color_tolerance=40)
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (30, 30, 30)  # within 40 of both
    with pytest.raises(
        MaskDecodeError, match=r"two_mask\.png: colour \(30, 30, 30\).*color_tolerance"
    ):
        c.decode_file(save(tmp_path / "two_mask.png", rgb))


@pytest.mark.parametrize(
    "kw",
    [
        dict(encoding="color", ignore_color=(255, 255, 255)),
        dict(encoding="index"),
        dict(encoding="grey", grey_levels=(0, 128, 255)),
    ],
    ids=["color", "index", "grey"],
)
def test_encode_image_round_trips_in_each_encoding(tmp_path, kw):
    """A mask SRPU writes (a round's predicted mask) reads back with the same codec: a
    colour PNG handed to an index-encoded set (nasa-ebc) would be refused on re-index."""
    c = codec(**kw)
    path = tmp_path / "round_mask.png"
    c.save_png(path, IDX)
    assert np.array_equal(c.decode_file(path), IDX)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, no temp left
    withbar = np.vstack([IDX, np.full((1, 4), IGNORE_INDEX, np.uint8)])
    c.save_png(path, withbar)
    back = c.decode_file(path)
    if kw["encoding"] == "grey":  # grey cannot say "unlabelled": class 0's level, and
        assert back[-1].tolist() == [0, 0, 0, 0]  # with_bar makes the bar unlabelled again
    else:
        assert np.array_equal(back, withbar)


def test_indexed_image_keeps_values_and_shows_colours():
    im = codec().indexed_image(IDX)
    assert im.mode == "P" and np.array_equal(np.asarray(im), IDX)
    assert tuple(im.convert("RGB").getpixel((1, 0))) == tuple(COLORS[1])
