"""Resampling sub-datasets of different pixel sizes to one: the plan's rule, training on
resampled samples, and every inference path resampling in and back."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from srpu_pipelines.active_learning.scoring import ensemble_probs
from srpu_pipelines.analysis.evaluate import evaluate_checkpoint, predict_folder
from srpu_pipelines.analysis.inference import input_scale, predict_labels, predict_probs
from srpu_pipelines.config import TrainParams, parse_params, stage_setup
from srpu_pipelines.data.dataset import (
    load_samples,
    resample_scale,
    resize_image,
    resize_mask,
    standardize,
)
from srpu_pipelines.data.demo import generate_demo
from srpu_pipelines.data.index import build_index
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.errors import InputError
from srpu_pipelines.models.checkpoint import read_checkpoint
from srpu_pipelines.training import plan as P
from srpu_pipelines.training.trainer import train_stage
from tests.conftest import tiny_params_dict
from tests.test_plan import _fp


def _sized(fp: dict, **sizes: float | tuple[float, float]) -> dict:
    """``fp`` with sub-datasets of these pixel sizes (a pair: an images' range)."""
    out = dict(fp)
    out["datasets"] = {}
    for d, s in sizes.items():
        lo, hi = s if isinstance(s, tuple) else (s, s)
        entry = {"pixel_size_nm": (lo * hi) ** 0.5}
        if isinstance(s, tuple):
            entry["pixel_size_range_nm"] = [lo, hi]
        out["datasets"][d] = entry
    return out


def test_the_resampling_rule_moves_with_the_pixel_sizes():
    fp = _fp()
    # unknown or alike pixel sizes: the images' own pixels
    assert P.resample_target(fp)[0] is None
    assert P.resample_target(_sized(fp, a=10.0))[0] is None
    assert P.resample_target(_sized(fp, a=10.0, b=11.0))[0] is None
    # sizes that differ: the median sub-dataset (each image moves least) ...
    target, why = P.resample_target(_sized(fp, a=5.0, b=10.0, c=20.0))
    assert target == 10.0 and "median" in why
    # ... moving with them
    assert P.resample_target(_sized(fp, a=5.0, b=15.0, c=20.0))[0] == 15.0
    # one sub-dataset whose own images differ is enough
    assert P.resample_target(_sized(fp, a=(4.0, 9.0)))[0] == pytest.approx(6.0)
    # a thin class: the finest size, so nothing is ever downsampled
    thin = _fp(rare={"thickness": 3.0})
    target, why = P.resample_target(_sized(thin, a=5.0, b=10.0, c=20.0))
    assert target == 5.0 and "finest" in why and "rare" in why
    # the names of sub-datasets do not matter
    assert P.resample_target(_sized(fp, x=5.0, y=10.0, z=20.0))[0] == 10.0
    # a phase 40 nm thick: 10 px in the 4 nm images, 5 px at the median (8 nm), so the
    # median would thin it out there although its pixel-weighted thickness (12 px) is not
    # thin: the finest
    per = _sized(fp, a=4.0, b=8.0, c=16.0)
    for d, px in (("a", 10.0), ("b", 12.0), ("c", 12.0)):
        per["datasets"][d]["classes"] = {"rare": {"share": 0.02, "thickness": px}}
    assert P.resample_target(per)[0] == 4.0
    per["datasets"]["a"]["classes"]["rare"]["thickness"] = 30.0  # 120 nm: 15 px at 8 nm
    assert P.resample_target(per)[0] == 8.0


def test_the_plan_sets_resample_nm_only_where_it_is_auto(tmp_path):
    from tests.test_plan import _setup

    fp = _sized(_fp(), a=5.0, b=20.0)
    cpu = P.Device("cpu", "c", 100.0, "t")
    auto = P.make_plan(_setup(tmp_path, resample_nm="auto"), fp, cpu, 0.05)
    assert auto.values["resample_nm"] == 12.5 and "12.5 nm" in auto.reasons["resample_nm"]
    assert "resampled to 12.5 nm" in auto.estimates["resolution"]
    explicit = _setup(tmp_path, resample_nm=7.0)
    plan = P.make_plan(explicit, fp, cpu, 0.05)
    assert "resample_nm" not in plan.values and "resampled to 7 nm" in plan.estimates["resolution"]
    assert "resample_nm" in P.planned_keys(_setup(tmp_path, resample_nm="auto"))
    with pytest.raises(ValueError, match="resample_nm"):
        _setup(tmp_path, resample_nm=-1)


def test_nearest_neighbour_keeps_the_mask_values():
    mask = np.zeros((30, 40), np.uint8)
    mask[10:12] = 2
    mask[:, :3] = 255
    for shape in [(60, 80), (15, 20), (45, 61)]:
        out = resize_mask(mask, shape)
        assert out.shape == shape and set(np.unique(out)) <= {0, 2, 255}
    assert resample_scale(10.0, 5.0) == 2.0 and resample_scale(None, 5.0) == 1.0
    assert resample_scale(10.0, None) == 1.0
    assert resample_scale(10.1, 10.0) == 1.0  # within 2 %: no interpolation blur
    with pytest.raises(InputError, match="in nm"):
        resample_scale(2000.0, 2.0)  # um given as nm, or the reverse


def test_the_mask_stays_on_the_image_when_resampled():
    img = np.zeros((45, 45), np.float32)
    img[20:25, 10:15] = 1.0  # a 5 px square
    mask = (img > 0).astype(np.uint8)
    for shape in [(30, 30), (67, 67), (90, 90)]:
        small_img = resize_image(img, shape)
        small_mask = resize_mask(mask, shape)
        cy_i, cx_i = np.argwhere(small_img > 0.5).mean(0)
        cy_m, cx_m = np.argwhere(small_mask > 0).mean(0)
        assert abs(cy_i - cy_m) <= 0.5 and abs(cx_i - cx_m) <= 0.5, shape


class Threshold(torch.nn.Module):
    def forward(self, x):
        return torch.cat([-x, x], 1) * 10


@pytest.mark.parametrize("scale", [0.5, 1.7, 3.0])
def test_prediction_at_another_scale_comes_back_at_the_images_pixels(scale):
    yy, xx = np.mgrid[:90, :130]
    img = (np.hypot(yy - 45, xx - 60) < 25).astype(np.float32) * 2 - 1  # a disc
    kw = dict(tile=32, overlap=0.25, batch_size=4)
    labels = predict_labels(Threshold(), img, scale, **kw)
    probs = predict_probs(Threshold(), img, scale, **kw)
    assert labels.shape == img.shape and probs.shape == (2, *img.shape)
    assert probs.dtype == np.float16 and np.allclose(probs.sum(0), 1, atol=2e-3)
    truth = (img > 0).astype(np.uint8)
    # only the disc's rim may move by the resampling
    assert (labels != truth).mean() < 0.02 and np.array_equal(labels, probs.argmax(0))
    assert input_scale({"resample_nm": 5.0}, 10.0) == 2.0 and input_scale({}, 10.0) == 1.0


class Recorder(torch.nn.Module):
    """Threshold, keeping the spread of what it was shown."""

    def __init__(self):
        super().__init__()
        self.stds: list[float] = []

    def forward(self, x):
        self.stds.append(float(x.std()))
        return torch.cat([-x, x], 1) * 10


def test_the_model_sees_a_resampled_image_standardised_as_in_training():
    noise = np.random.default_rng(1).random((128, 128)).astype(np.float32)
    rec = Recorder()
    predict_labels(rec, standardize(noise), 0.5, tile=64, overlap=0.0, batch_size=8)
    # area averaging halves the noise's spread; standardised again, the model sees ~1
    assert np.mean(rec.stds) == pytest.approx(1.0, abs=0.1)


def test_the_ensemble_resamples_mean_and_variance_back(demo_params):
    p = demo_params
    img = np.random.default_rng(0).standard_normal((70, 90)).astype(np.float32)
    img = np.where(np.hypot(*np.mgrid[-35:35, -45:45]) < 20, 1.0, -1.0).astype(np.float32)
    mean, var = ensemble_probs(Threshold(), img, p, 1, scale=2.0)
    assert mean.shape == (2, 70, 90) and mean.dtype == np.float16
    assert var is None or (var.shape == (70, 90) and var.min() >= 0)
    assert (mean.argmax(0) != (img > 0)).mean() < 0.02  # the disc, at the image's pixels


@pytest.fixture(scope="module")
def resampled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resample")
    d = tiny_params_dict(tmp)
    d["data"]["datasets"][0]["pixel_size_nm"] = 5.0
    d["data"]["datasets"][1]["pixel_size_nm"] = 10.0
    d["train"]["resample_nm"] = "auto"
    p = parse_params(d)
    generate_demo(p)
    index = build_index(p, show_progress=False)
    res = train_stage(stage_setup(p), index, progress=False)
    return p, index, res


def test_training_resamples_and_the_checkpoint_records_the_pixels(resampled_run, caplog):
    p, index, res = resampled_run
    plan = json.loads((p.train.out_dir / "plan.json").read_text())
    target = plan["values"]["resample_nm"]
    # the demo's carbon is a few px thick: the finest (5 nm), never the median (7.5)
    assert target == 5.0 and "finest" in plan["reasons"]["resample_nm"]
    _, cfg = read_checkpoint(res.best_checkpoint)
    assert cfg["resample_nm"] == target
    items = [it for it in index["items"] if it["split"] == "train"]
    codec = MaskCodec.from_params(p)
    native = load_samples(items, codec, progress=False)
    moved = load_samples(items, codec, progress=False, resample_nm=target)
    for a, b in zip(native, moved, strict=True):
        s = a.pixel_size_nm / target
        assert b.mask.shape == (round(a.mask.shape[0] * s), round(a.mask.shape[1] * s))
        assert b.pixel_size_nm == target and b.scale == pytest.approx(s)
        assert set(np.unique(b.mask)) <= set(np.unique(a.mask))
    # an image of unknown size is kept at its own pixels, and said so
    blind = [{**items[0], "pixel_size_nm": None}]
    with caplog.at_level(logging.WARNING):
        kept = load_samples(blind, codec, progress=False, resample_nm=target)
    assert kept[0].mask.shape == native[0].mask.shape and "unknown pixel size" in caplog.text


def test_evaluation_and_prediction_answer_at_the_images_own_pixels(
    resampled_run, tmp_path, monkeypatch
):
    import srpu_pipelines.analysis.evaluate as E

    p, index, res = resampled_run
    scales: list[float] = []
    real = E.predict_labels

    def recording(model, image, scale=1.0, **kw):
        scales.append(scale)
        return real(model, image, scale, **kw)

    monkeypatch.setattr(E, "predict_labels", recording)
    m = evaluate_checkpoint(p, index, res.best_checkpoint, split="val", progress=False)
    assert 0 <= m["miou"] <= 1 and m["images"] > 0
    val = [it for it in index["items"] if it["split"] == "val"]
    want = sorted(resample_scale(it["pixel_size_nm"], 5.0) for it in val)
    assert sorted(scales) == want and 2.0 in want  # the 10 nm images enlarged twice
    scales.clear()
    src = tmp_path / "in"
    src.mkdir()
    first = next(it for it in index["items"] if it["dataset"] == "b")
    suffix = first["image"].rsplit(".", 1)[-1]
    (src / f"x.{suffix}").write_bytes(open(first["image"], "rb").read())
    pp = p.model_copy(update={"predict": p.predict.model_copy(update={"pixel_size_nm": 10.0})})
    out = predict_folder(pp, res.best_checkpoint, src, tmp_path / "out", progress=False)
    row = out["predicted"][0]
    assert (row["height"], row["width"]) == (first["height"], first["width"])
    from PIL import Image

    pred = np.array(Image.open(tmp_path / "out" / "x_pred.png"))
    assert pred.shape[:2] == (first["height"], first["width"]) and scales == [2.0]


def warm_train(d: dict, index: dict, start) -> TrainParams:
    """The train section a stage of params dict ``d`` trains with, warm from ``start``
    (the keys left ``auto`` planned, or kept from the start weights)."""
    from srpu_pipelines.training.trainer import StageTask

    return StageTask(stage_setup(parse_params(d)), index, init_weights=start).tp


def test_a_warm_start_keeps_the_pixels_its_weights_learnt_at(resampled_run, tmp_path):
    from srpu_pipelines.training.trainer import start_pixels

    p, index, res = resampled_run
    assert start_pixels(res.best_checkpoint) == (True, 5.0, 1.0)
    # a registry copy: the config only inside the .pt
    bare = tmp_path / "copy.pt"
    bare.write_bytes(res.best_checkpoint.read_bytes())
    assert start_pixels(bare) == (True, 5.0, 1.0)
    torch.save({"w": torch.zeros(1)}, tmp_path / "state.pt")  # a bare state_dict
    assert start_pixels(tmp_path / "state.pt") == (False, None, 1.0)
    d = json.loads(p.model_dump_json())
    d["train"]["out_dir"] = str(tmp_path / "next")
    d["data"]["datasets"][1]["pixel_size_nm"] = 20.0  # the plan alone would move
    index2 = build_index(parse_params(d), show_progress=False)
    assert warm_train(d, index2, res.best_checkpoint).resample_nm == 5.0
    d["train"]["resample_nm"] = 8.0  # an explicit value wins
    assert warm_train(d, index2, res.best_checkpoint).resample_nm == 8.0


def test_the_mlflow_model_takes_the_inputs_pixel_size(resampled_run, monkeypatch):
    import srpu_pipelines.analysis.inference as I
    from srpu_pipelines.resources.mlflow_model import SrpuSegmenter

    p, index, res = resampled_run
    seg = SrpuSegmenter()
    seg.load_context(type("C", (), {"artifacts": {"checkpoint": str(res.best_checkpoint)}})())
    scales: list[float] = []
    real = I.predict_labels
    monkeypatch.setattr(
        I, "predict_labels", lambda m, im, sc=1.0, **kw: scales.append(sc) or real(m, im, sc, **kw)
    )
    x = np.random.default_rng(0).random((50, 70)).astype(np.float32)
    out = seg.predict(None, x, {"tile_size": 64, "pixel_size_nm": 10.0})
    assert out.shape == (50, 70) and scales == [2.0]
    seg.predict(None, x, {"tile_size": 64})  # pixel size unknown: its own pixels
    assert scales == [2.0, 1.0]
