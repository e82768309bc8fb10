"""Reading the image files users really have, and failing clearly on bad ones."""

import numpy as np
import pytest
import tifffile
from PIL import Image

from srpu_pipelines.data.imageio import ImageReadError, read_grey, read_raw
from tests.conftest import save

GRAD8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64 x 64


def test_grey_png_and_jpeg(tmp_path):
    a = read_grey(save(tmp_path / "g.png", GRAD8))
    assert a.dtype == np.float32 and a.shape == (64, 64)
    assert a.min() == 0 and abs(a.max() - 252 / 255) < 1e-6
    j = read_grey(save(tmp_path / "g.jpg", GRAD8, quality=95))
    assert np.abs(j - a).max() < 0.05


def test_rgb_grey_copy_is_exact(tmp_path):
    rgb = np.repeat(GRAD8[..., None], 3, -1)
    assert np.array_equal(
        read_grey(save(tmp_path / "c.tif", rgb)), read_grey(save(tmp_path / "g.png", GRAD8))
    )


def test_rgba_and_true_colour(tmp_path):
    rgba = np.dstack([GRAD8, GRAD8, GRAD8, np.full_like(GRAD8, 7)])
    assert np.allclose(read_grey(save(tmp_path / "a.png", rgba)), GRAD8 / 255.0, atol=1e-6)
    col = np.dstack([GRAD8, np.zeros_like(GRAD8), np.zeros_like(GRAD8)])
    assert np.allclose(read_grey(save(tmp_path / "r.png", col)), 0.299 * GRAD8 / 255.0, atol=1e-5)


@pytest.mark.parametrize("ext", [".png", ".tif"])
def test_16bit_is_scaled_not_clipped(tmp_path, ext):
    arr = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    p = tmp_path / f"w{ext}"
    if ext == ".tif":
        tifffile.imwrite(p, arr)
    else:
        Image.fromarray(arr).save(p)
    g = read_grey(p)
    assert g.max() == pytest.approx(65520 / 65535, abs=1e-6)
    assert len(np.unique(g)) == 64 * 64  # every level kept: no clipping to 8 bit


def test_16bit_rgb_tiff(tmp_path):
    arr = np.repeat((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)[..., None], 3, -1)
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, arr, photometric="rgb")
    assert read_grey(p).max() == pytest.approx(65520 / 65535, abs=1e-6)


def test_palette_tiff_and_png(tmp_path):
    im = Image.fromarray((GRAD8 // 64).astype(np.uint8), mode="L").convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255, 0, 255, 0] + [0] * (256 * 3 - 12))
    for name in ("p.tif", "p.png"):
        im.save(tmp_path / name)
        assert read_raw(tmp_path / name).shape == (64, 64, 4)  # colours
        assert set(np.unique(read_raw(tmp_path / name, palette="index"))) <= {0, 1, 2, 3}


def test_truncated_file_names_the_file(tmp_path):
    p = save(tmp_path / "full.png", np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8))
    cut = tmp_path / "cut file.png"
    cut.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(ImageReadError, match=r"cut file\.png: unreadable or truncated"):
        read_grey(cut)
    t = tmp_path / "cut.tif"
    tifffile.imwrite(t, np.random.default_rng(0).integers(0, 255, (128, 128), np.uint8))
    t.write_bytes(t.read_bytes()[:300])
    with pytest.raises(ImageReadError, match=r"cut\.tif"):
        read_grey(t)


def test_garbage_and_non_images(tmp_path):
    g = tmp_path / "noise.png"
    g.write_bytes(b"this is not a png")
    with pytest.raises(ImageReadError, match=r"noise\.png: not a readable image"):
        read_grey(g)
    t = tmp_path / "notes.txt"
    t.write_text("hello")
    with pytest.raises(ImageReadError, match=r"notes\.txt: not an image file"):
        read_grey(t)
    with pytest.raises(ImageReadError, match="file not found"):
        read_grey(tmp_path / "missing.png")


def test_unicode_and_space_names(tmp_path):
    p = save(tmp_path / "Kathode Probe µ-3 ü.png", GRAD8)
    assert read_grey(p).shape == (64, 64)


def test_miniswhite_tiff_is_not_inverted(tmp_path):
    p = tmp_path / "mw.tif"
    tifffile.imwrite(p, GRAD8, photometric="miniswhite")
    assert np.allclose(read_grey(p), (255 - GRAD8) / 255.0, atol=1e-6)  # as PIL shows it
    from PIL import Image as _I

    assert np.array_equal(np.array(_I.open(p)), 255 - GRAD8)


GRAD16 = (np.arange(96 * 80, dtype=np.uint32).reshape(96, 80) * 8 % 65536).astype(np.uint16)


@pytest.mark.parametrize(
    "kw",
    [
        {"compression": "lzw"},
        {"compression": "zlib"},  # Deflate, as ImageJ and many instruments write it
        {"compression": "packbits"},
        {"compression": "zstd"},
        {"compression": "lzw", "predictor": True},
        {"compression": "zlib", "tile": (32, 32)},  # tiled
        {"compression": "lzw", "bigtiff": True},
    ],
    ids=lambda kw: "-".join(f"{k}={v}" for k, v in kw.items()),
)
def test_compressed_tiled_and_big_tiffs_read_exactly(tmp_path, kw):
    """Every lossless TIFF layout instruments and ImageJ write gives back its pixels, 8-
    and 16-bit."""
    for name, arr in (("g8.tif", GRAD8), ("g16.tif", GRAD16)):
        p = tmp_path / name
        tifffile.imwrite(p, arr, **kw)
        assert np.array_equal(read_raw(p), arr), (name, kw)


def test_jpeg_in_tiff_reads(tmp_path):
    p = tmp_path / "jpeg.tif"
    smooth = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    tifffile.imwrite(p, smooth, compression="jpeg", compressionargs={"level": 95})
    assert np.abs(read_raw(p).astype(int) - smooth).max() <= 8  # lossy, but close


def test_a_missing_codec_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    p = tmp_path / "lzw.tif"
    tifffile.imwrite(p, GRAD8, compression="lzw")

    def no_codec(self, *a, **k):
        raise ValueError("<COMPRESSION.LZW: 5> requires the 'imagecodecs' package")

    monkeypatch.setattr(tifffile.TiffPage, "asarray", no_codec)
    with pytest.raises(
        ImageReadError, match=r"lzw\.tif: TIFF compressed with LZW.*imagecodecs"
    ) as e:
        read_raw(p)
    assert "truncated" not in str(e.value)
    # damaged compressed data says so, and names the compression
    monkeypatch.undo()
    data = bytearray(p.read_bytes())
    q = tmp_path / "cut lzw.tif"
    q.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(ImageReadError, match=r"cut lzw\.tif"):
        read_raw(q)
