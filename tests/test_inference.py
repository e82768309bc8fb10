"""Sliding-window inference, metrics, evaluation and folder prediction."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint, predict_folder
from srpu_pipelines.analysis.inference import predict_probs
from srpu_pipelines.analysis.metrics import ConfusionAccumulator, scores_from_confusion
from srpu_pipelines.config import parse_params, stage_setup
from srpu_pipelines.data.demo import generate_demo
from srpu_pipelines.data.index import build_index
from srpu_pipelines.training.trainer import train_stage
from tests.conftest import tiny_params_dict


class Threshold(torch.nn.Module):
    """Class 1 where the input is positive: a model with a known answer."""

    def forward(self, x):
        return torch.cat([-x, x], 1) * 10


@pytest.mark.parametrize("shape", [(40, 50), (64, 64), (150, 97)])
def test_sliding_window_reproduces_the_pointwise_answer(shape):
    img = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    probs = predict_probs(Threshold(), img, tile=32, overlap=0.5, batch_size=3)
    assert probs.shape == (2, *shape)
    assert np.allclose(probs.sum(0), 1, atol=1e-5)
    assert np.array_equal(probs.argmax(0), (img > 0).astype(np.int64))


class LeftHalf(torch.nn.Module):
    """Class 1 on the left half of every window: flips average it to 0.5 everywhere."""

    def forward(self, x):
        t = x.shape[-1]
        left = (torch.arange(t) < t // 2).float().expand_as(x) * 20 - 10
        return torch.cat([-left, left], 1)


def test_flip_averaging_undoes_each_flip_before_it_averages():
    img = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    same = predict_probs(Threshold(), img, tile=32, overlap=0.5, batch_size=3, flips=True)
    assert np.array_equal(same.argmax(0), (img > 0).astype(np.int64))  # flip-equivariant
    half = predict_probs(LeftHalf(), img, tile=64, overlap=0.0, flips=True)
    assert np.allclose(half, 0.5, atol=1e-3)  # a left-right flip moves the half across


def test_scores_from_a_known_confusion_matrix():
    cm = np.array([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    s = scores_from_confusion(cm, ["a", "b", "c"])
    assert s["iou"]["a"] == pytest.approx(8 / 11) and s["iou"]["b"] == pytest.approx(9 / 12)
    assert s["dice"]["a"] == pytest.approx(16 / 19)
    assert np.isnan(s["iou"]["c"]) and s["miou"] == pytest.approx((8 / 11 + 9 / 12) / 2)
    acc = ConfusionAccumulator(2)
    acc.update(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [255, 0]]))
    assert acc.matrix.tolist() == [[1, 1], [0, 1]]  # the 255 pixel is not counted


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny trained model shared by this module's tests (training is the slow part)."""
    params = parse_params(tiny_params_dict(tmp_path_factory.mktemp("trained")))
    generate_demo(params)
    index = build_index(params, show_progress=False)
    res = train_stage(stage_setup(params), index, progress=False)
    return params, index, res.best_checkpoint


def test_evaluate_writes_metrics_and_overlays(trained):
    params, index, ckpt = trained
    m = evaluate_checkpoint(params, index, ckpt, progress=False)
    assert set(m["iou"]) == set(params.class_names) and set(m["per_dataset"]) == {"a", "b"}
    assert m["images"] == 2 and len(m["per_image"]) == 2
    assert (params.evaluate.out_dir / "metrics.json").is_file()
    ov = list((params.evaluate.out_dir / "overlays").glob("*.png"))
    assert len(ov) == 1 and Image.open(ov[0]).size == (64 * 3 + 12, 64)
    # truth and prediction panels show the demo's data bar hatched as 'not sample'
    fig = np.array(Image.open(ov[0]).convert("RGB"))
    bar = params.demo.info_bar
    for x0 in (64 + 6, 2 * (64 + 6)):
        assert set(np.unique(fig[-bar:, x0 : x0 + 64])) == {60, 150}
    assert len(set(np.unique(fig[:-bar, 2 * (64 + 6) :]))) > 2  # the sample is not


def test_predict_folder_full_size_and_skips(trained):
    params, _, ckpt = trained
    src = params.predict.input_dir
    (src / "readme.txt").write_text("not an image")
    (src / "broken.png").write_bytes(b"\x89PNG garbage")
    res = predict_folder(params, ckpt, progress=False)
    assert len(res["predicted"]) == 1 and len(res["skipped"]) == 2
    stem = "new sample 0"
    img = Image.open(src / f"{stem}.png")
    colour = Image.open(params.predict.out_dir / f"{stem}_pred.png")
    index = np.array(Image.open(params.predict.out_dir / f"{stem}_pred_index.png"))
    assert colour.size == img.size and index.shape == img.size[::-1]
    # the demo's data bar (8 rows, found in the pixels) is 'not sample', never a phase
    bar = params.demo.info_bar
    entry = res["predicted"][0]
    assert entry["data_bar_rows"] == bar and entry["data_bar_source"].startswith("detected")
    assert (index[-bar:] == 255).all() and set(np.unique(index[:-bar])) <= {0, 1, 2}
    lut = np.zeros((256, 3), np.uint8)
    lut[:3] = [c.color for c in params.classes]
    lut[255] = params.mask.ignore_color
    assert np.array_equal(np.array(colour.convert("RGB")), lut[index])
    # the class fractions are shares of the sample: the bar is in none of them
    sample = index[:-bar]
    for k, n in enumerate(params.class_names):
        assert entry["class_fractions"][n] == pytest.approx((sample == k).mean(), abs=1e-6)
    assert sum(entry["class_fractions"].values()) == pytest.approx(1.0, abs=1e-5)
    # the indexed PNG carries the class colours as its palette; the TIFF holds the same labels
    pal = Image.open(params.predict.out_dir / f"{stem}_pred_index.png")
    assert pal.mode == "P"
    assert pal.getpalette()[:9] == [v for c in params.classes for v in c.color]
    import tifffile

    with tifffile.TiffFile(params.predict.out_dir / f"{stem}_labels.tif") as tf:
        assert tf.pages.first.photometric == tifffile.PHOTOMETRIC.PALETTE
        assert np.array_equal(tf.asarray(), index)
    # the overlay: image | prediction, the bar hatched (two greys), not painted as a phase
    ov = np.array(Image.open(params.predict.out_dir / f"{stem}_overlay.png").convert("RGB"))
    w = img.size[0]
    assert ov.shape == (img.size[1], 2 * w + 6, 3)
    hatched = ov[-bar:, w + 6 :]
    assert set(np.unique(hatched)) == {60, 150}


def test_predict_overlay_has_a_scale_bar_when_the_pixel_size_is_known(trained, tmp_path):
    params, _, ckpt = trained
    p = params.model_copy(deep=True)
    p.predict.pixel_size_nm = 100.0  # 64 px = 6.4 um: a 1 um bar of 10 px
    res = predict_folder(p, ckpt, out_dir=tmp_path, progress=False)
    entry = res["predicted"][0]
    assert entry["pixel_size_nm"] == 100.0 and "predict.pixel_size_nm" in entry["pixel_size_source"]
    stem = Path(entry["image"]).stem
    h, w = entry["height"], entry["width"]
    ov = np.array(Image.open(tmp_path / f"{stem}_overlay.png").convert("RGB"))
    first = ov[:, :w]
    white = np.all(first == 255, axis=-1)
    bar_rows = [y for y in range(h) if white[y].sum() >= 10]
    assert bar_rows and max(bar_rows) < h - params.demo.info_bar  # above the data bar
    plain = np.array(Image.open(params.predict.out_dir / f"{stem}_overlay.png").convert("RGB"))
    assert not np.array_equal(plain[:, :w], first)  # without a pixel size: no bar


def test_predict_refuses_to_write_into_its_input(trained):
    params, _, ckpt = trained
    with pytest.raises(ValueError, match="must differ"):
        predict_folder(params, ckpt, out_dir=params.predict.input_dir, progress=False)


def test_evaluate_refuses_other_classes(trained):
    params, index, ckpt = trained
    p = params.model_copy(deep=True)
    p.classes[0].name = "pores"
    with pytest.raises(ValueError, match="trained for classes"):
        evaluate_checkpoint(p, index, ckpt, progress=False)


def test_bf16_only_where_the_cpu_has_it_natively():
    """Emulated bfloat16 (plain AVX512) trains 2.5x slower than fp32: auto means fp32 there."""
    from srpu_pipelines.compute.device import cpu_has_native_bf16, resolve_precision

    assert cpu_has_native_bf16("flags : fpu sse avx512f avx512_bf16 amx_tile")
    assert cpu_has_native_bf16("flags : fpu avx512f amx_bf16 amx_tile")
    assert not cpu_has_native_bf16("flags : fpu sse avx512f avx512bw avx512_vnni")
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu).dtype == torch.bfloat16
    assert resolve_precision("fp32", cpu).dtype is None


def test_windows_stream_in_bands_of_bounded_height():
    """A tall image: no band is more than a few tiles high, and together they cover every
    row once (memory does not grow with the image)."""
    from srpu_pipelines.analysis.inference import iter_prob_bands

    img = np.random.default_rng(1).standard_normal((1000, 70)).astype(np.float32)
    bands = list(iter_prob_bands(Threshold(), img, tile=32, overlap=0.5, batch_size=3))
    rows = [p.shape[1] for _, p in bands]
    assert sum(rows) == 1000 and [y for y, _ in bands] == list(np.cumsum([0, *rows[:-1]]))
    assert max(rows) <= 2 * 32 and len(bands) > 20
    full = np.concatenate([p.numpy() for _, p in bands], 1)
    assert np.array_equal(full.argmax(0), (img > 0).astype(np.int64))
