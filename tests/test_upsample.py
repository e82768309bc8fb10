"""Enlarging the images for thin classes (``train.upsample``): the plan's rule, training on
enlarged samples, the checkpoint recording the factor and every inference path enlarging
alike and answering at the images' own pixels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.analysis.inference import input_scale
from srpu_pipelines.config import parse_params, stage_setup
from srpu_pipelines.data.dataset import load_samples
from srpu_pipelines.data.demo import generate_demo
from srpu_pipelines.data.index import build_index
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.models.checkpoint import read_checkpoint
from srpu_pipelines.training import plan as P
from srpu_pipelines.training.trainer import StageTask, start_pixels, train_stage
from tests.conftest import tiny_params_dict
from tests.test_plan import CPU, GPU, _fp, _setup
from tests.test_resample import warm_train

THIN = {"thickness": 3.0}


def _up(tmp_path, fp, dev, **train):
    return P.make_plan(_setup(tmp_path, upsample="auto", **train), fp, dev, 0.05)


def test_the_upsampling_rule_moves_with_thickness_and_budget(tmp_path):
    # a thin class and a budget that affords it: 2x, on a tile twice as large
    plan = _up(tmp_path, _fp(rare=THIN), GPU)
    native = P.make_plan(_setup(tmp_path, upsample=1), _fp(rare=THIN), GPU, 0.05)
    assert plan.values["upsample"] == 2.0 and "rare 3.0 px" in plan.reasons["upsample"]
    assert plan.values["tile_size"] == 2 * native.values["tile_size"]
    assert "enlargement" in plan.reasons["tile_size"]
    assert "enlarged 2x" in plan.estimates["resolution"]
    # on the GPU the batch is planned for the enlarged tile (about 2 M pixels a step)
    t = plan.values["tile_size"]
    assert plan.values["batch_size"] * t * t <= native.values["batch_size"] * 256 * 256
    # the class grows thicker than THIN_PX: nothing to enlarge
    thick = _up(tmp_path, _fp(rare={"thickness": 12.0}), GPU)
    assert thick.values["upsample"] == 1.0 and "no class" in thick.reasons["upsample"]
    # a small budget: the enlarged tile would leave too few steps
    short = _up(tmp_path, _fp(rare=THIN), CPU)
    assert short.values["upsample"] == 1.0 and "steps" in short.reasons["upsample"]
    assert short.values["tile_size"] <= P.TILE_CAP["cpu"]
    # ... a larger one on the same CPU affords it
    long = _up(tmp_path, _fp(rare=THIN), CPU, budget_s=600_000.0)
    assert long.values["upsample"] == 2.0
    # a step budget alone fixes the steps, not the time: no enlargement
    steps_only = _up(tmp_path, _fp(rare=THIN), GPU, budget_s=None)
    assert steps_only.values["upsample"] == 1.0 and "step budget" in steps_only.reasons["upsample"]
    # validation is planned for the enlarged images (4x the pixels)
    # (the same tile: with a planned one, training a step grows as much as validating)
    a = P.make_plan(_setup(tmp_path, upsample=2, tile_size=224), _fp(rare=THIN), CPU, 0.05, 10**8)
    b = P.make_plan(_setup(tmp_path, upsample=1, tile_size=224), _fp(rare=THIN), CPU, 0.05, 10**8)
    assert a.values["val_every"] > b.values["val_every"]


def test_an_explicit_upsample_wins_and_a_bad_one_names_the_key(tmp_path):
    plan = P.make_plan(_setup(tmp_path, upsample=1.5), _fp(rare=THIN), GPU, 0.05)
    assert "upsample" not in plan.values and "enlarged 1.5x" in plan.estimates["resolution"]
    # a given factor (or one kept from warm-start weights) enlarges a planned tile alike
    native = P.make_plan(_setup(tmp_path, upsample=1), _fp(rare=THIN), GPU, 0.05)
    want = P._round32(1.5 * native.values["tile_size"])
    assert plan.values["tile_size"] == want and "enlargement" in plan.reasons["tile_size"]
    # ... but not an explicit one
    fixed = P.make_plan(_setup(tmp_path, upsample=2, tile_size=96), _fp(rare=THIN), GPU, 0.05)
    assert "tile_size" not in fixed.values
    # the enlarged tile stops at ENLARGED_TILE_CAP (a GPU's memory)
    wide = {"thickness": 3.0, "extent": 4000.0}
    big = _fp(rare=wide, mid={"extent": 4000.0})
    big["height"] = big["width"] = {"min": 4096, "median": 4096, "max": 4096}
    capped = P.make_plan(_setup(tmp_path, upsample=2), big, GPU, 0.05)
    assert (
        capped.values["tile_size"] == P.ENLARGED_TILE_CAP
        and "capped" in (capped.reasons["tile_size"])
    )
    assert "upsample" in P.planned_keys(_setup(tmp_path, upsample="auto"))
    assert "upsample" not in P.planned_keys(_setup(tmp_path, upsample=2))
    for bad in (0.5, 5, "twice"):
        with pytest.raises(ValueError, match="upsample"):
            _setup(tmp_path, upsample=bad)


@pytest.fixture(scope="module")
def upsampled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("upsample")
    d = tiny_params_dict(tmp)
    d["data"]["datasets"][1]["pixel_size_nm"] = 10.0  # one of known size, one not
    d["train"]["upsample"] = 2.0
    p = parse_params(d)
    generate_demo(p)
    index = build_index(p, show_progress=False)
    res = train_stage(stage_setup(p), index, progress=False)
    return p, index, res


def test_training_enlarges_and_the_checkpoint_records_the_factor(upsampled_run):
    p, index, res = upsampled_run
    _, cfg = read_checkpoint(res.best_checkpoint)
    assert cfg["upsample"] == 2.0 and "resample_nm" not in cfg
    items = [it for it in index["items"] if it["split"] == "train"]
    codec = MaskCodec.from_params(p)
    native = load_samples(items, codec, progress=False)
    big = load_samples(items, codec, progress=False, upsample=2.0)
    for a, b in zip(native, big, strict=True):
        assert b.mask.shape == (2 * a.mask.shape[0], 2 * a.mask.shape[1]) and b.scale == 2.0
        assert set(np.unique(b.mask)) <= set(np.unique(a.mask))
        # a known pixel size is halved with the enlargement; an unknown one stays unknown
        assert b.pixel_size_nm == (a.pixel_size_nm / 2 if a.pixel_size_nm else None)
    # the factor multiplies the resampling to a pixel size
    assert input_scale(cfg, None) == 2.0 and input_scale(cfg, 10.0) == 2.0
    assert input_scale({"resample_nm": 5.0, "upsample": 2.0}, 10.0) == 4.0


def test_evaluation_enlarges_every_image_and_scores_it_at_its_own_pixels(
    upsampled_run, monkeypatch
):
    import srpu_pipelines.analysis.evaluate as E

    p, index, res = upsampled_run
    scales: list[float] = []
    real = E.predict_labels

    def recording(model, image, scale=1.0, **kw):
        scales.append(scale)
        out = real(model, image, scale, **kw)
        assert out.shape == image.shape  # labels at the image's own pixels
        return out

    monkeypatch.setattr(E, "predict_labels", recording)
    m = evaluate_checkpoint(p, index, res.best_checkpoint, split="val", progress=False)
    assert 0 <= m["miou"] <= 1 and m["images"] > 0
    assert scales == [2.0] * m["images"]


def test_a_warm_start_keeps_its_enlargement_unless_one_is_given(upsampled_run, tmp_path):
    p, index, res = upsampled_run
    assert start_pixels(res.best_checkpoint) == (True, None, 2.0)
    d = json.loads(p.model_dump_json())
    d["train"]["out_dir"] = str(tmp_path / "next")
    d["train"]["upsample"] = "auto"
    assert warm_train(d, index, res.best_checkpoint).upsample == 2.0
    d["train"]["upsample"] = 1.0  # an explicit value wins
    assert warm_train(d, index, res.best_checkpoint).upsample == 1.0


def test_the_run_fingerprint_sees_the_factor(upsampled_run, tmp_path):
    p, index, _ = upsampled_run
    d = json.loads(p.model_dump_json())
    d["train"]["out_dir"] = str(tmp_path / "fp")
    fps = {}
    for up in (1.0, 2.0):
        d["train"]["upsample"] = up
        fps[up] = StageTask(stage_setup(parse_params(d)), index).fingerprint()
    assert fps[1.0] != fps[2.0]  # a last.pt of the other factor is not resumed


def test_a_factor_of_one_leaves_saved_plans_as_they_were(tmp_path):
    # runs and plans saved before the key existed hold: a factor of 1 is not among the
    # plan's inputs, any other value or auto is
    assert "upsample" in P.unset_train_keys(_setup(tmp_path, upsample=1).train)
    assert "upsample" not in P.unset_train_keys(_setup(tmp_path, upsample=2).train)
    assert "upsample" not in P.unset_train_keys(_setup(tmp_path, upsample="auto").train)
