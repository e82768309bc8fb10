"""The data fingerprint and the training plan: object sizes measured on constructed masks,
each rule moving the right way when one fingerprint quantity moves, explicit values
winning over the plan, and a training run that records the plan it used."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from srpu_pipelines.config import parse_params, stage_setup
from srpu_pipelines.data.fingerprint import class_objects, fingerprint, item_stats
from srpu_pipelines.data.index import build_index
from srpu_pipelines.training import plan as P
from srpu_pipelines.training.trainer import train_stage
from tests.conftest import tiny_params_dict

CPU = P.Device("cpu", "test cpu", 100.0, "test")
GPU = P.Device("cuda", "test gpu", 100_000.0, "test")
ALL_AUTO = {
    k: "auto"
    for k in ("tile_size", "batch_size", "lr", "warmup_steps", "rare_crop_prob", "val_every")
}


def test_objects_of_a_line_and_a_disc_have_their_sizes():
    mask = np.zeros((200, 200), np.uint8)
    mask[50:53, 20:140] = 1  # a line 3 px thick, 120 px long
    yy, xx = np.mgrid[:200, :200]
    mask[(yy - 150) ** 2 + (xx - 150) ** 2 <= 20**2] = 2  # a disc 41 px across
    mask[190:, 190:] = 255  # not labelled: belongs to no class
    line, disc = class_objects(mask, 1), class_objects(mask, 2)
    assert line["count"] == 1 and line["pixels"] == 360
    assert line["thickness"] == pytest.approx(3.0, abs=0.6)
    assert line["extent"] == 120 and line["elongation"] > 30
    assert disc["thickness"] == pytest.approx(41, rel=0.1) and disc["extent"] == 41
    assert disc["elongation"] < 2
    assert line["anisotropy"] > 0.8 and disc["anisotropy"] < 0.1
    assert class_objects(mask, 3) is None


def test_fingerprint_combines_images_by_pixels_and_per_subdataset():
    def item(i, ds, thick):
        m = np.zeros((64, 96), np.uint8)
        m[10 : 10 + thick, 5:60] = 1
        g = np.full((64, 96), 0.25 + 0.5 * i, np.float32)
        raw = (g * 255).astype(np.uint8)
        st = item_stats(raw, g, m, 2)
        return {
            "id": f"x{i}",
            "dataset": ds,
            "height": 64,
            "width": 96,
            "mask_sha256": str(i),
            "stats": st,
        }

    items = [item(0, "a", 3), item(1, "b", 9)]
    fp = fingerprint(items, ["bg", "fg"], {"a": 5.0})
    assert fp["images"] == 2 and fp["bit_depth"] == [8]
    assert fp["datasets"]["a"]["classes"]["fg"]["thickness"] == pytest.approx(3, abs=0.6)
    assert fp["datasets"]["b"]["classes"]["fg"]["thickness"] == pytest.approx(9, abs=1)
    # three times the pixels: the thick line weighs three times as much
    assert 6 < fp["classes"]["fg"]["thickness"] < 9
    assert fp["intensity"]["mean_spread"] == pytest.approx(0.25, abs=0.01)
    assert (
        fp["datasets"]["a"]["pixel_size_nm"] == 5.0 and fp["datasets"]["b"]["pixel_size_nm"] is None
    )
    with pytest.raises(ValueError, match="srpu index"):
        fingerprint([{**items[0], "stats": None}], ["bg", "fg"])


def _fp(**cls) -> dict:
    """A constructed fingerprint: a dominant background, a mid phase and a rare one."""
    base = {
        "bg": {
            "share": 0.8,
            "thickness": 300.0,
            "extent": 512.0,
            "anisotropy": 0.2,
            "elongation": 2,
        },
        "mid": {
            "share": 0.18,
            "thickness": 40.0,
            "extent": 100.0,
            "anisotropy": 0.2,
            "elongation": 3,
        },
        "rare": {
            "share": 0.02,
            "thickness": 12.0,
            "extent": 60.0,
            "anisotropy": 0.2,
            "elongation": 5.0,
        },
    }
    for name, upd in cls.items():
        base[name] = {**base[name], **upd}
    return {
        "images": 10,
        "height": {"min": 1024, "median": 1024, "max": 1024},
        "width": {"min": 1024, "median": 1024, "max": 1024},
        "intensity": {"mean": 0.5, "std": 0.2, "mean_spread": 0.05, "std_spread": 0.02},
        "classes": base,
    }


def _setup(tmp_path, budget_s=600.0, **train):
    d = tiny_params_dict(tmp_path)
    d["classes"] = [
        {"name": n, "color": c}
        for n, c in zip(["bg", "mid", "rare"], [[0, 0, 0], [0, 0, 255], [255, 0, 0]], strict=True)
    ]
    d["model"] = {"arch": "unet", "encoder": "resnet18", "decoder_channels": [128, 64, 32, 16, 16]}
    d["train"].update(
        {
            **ALL_AUTO,
            "loss": "auto",
            "augment": "auto",
            "budget_s": budget_s,
            "epochs": 100,
            "steps_per_epoch": 25,
        },
        **train,
    )
    return stage_setup(parse_params(d))


def _plan(setup, fp, dev=CPU):
    return P.make_plan(setup, fp, dev, 0.05).values


def test_each_rule_moves_the_right_way(tmp_path, monkeypatch):
    s = _setup(tmp_path)
    base = _plan(s, _fp())
    # larger structures: a larger tile (more context); a smaller budget: a smaller tile
    assert _plan(s, _fp(mid={"extent": 40.0}))["tile_size"] < base["tile_size"]
    assert _plan(_setup(tmp_path, budget_s=60.0), _fp())["tile_size"] < base["tile_size"]
    # a rarer class weighs more, and more crops are centred on rare classes
    rarer = _plan(s, _fp(rare={"share": 0.002}))
    assert rarer["loss"]["class_weights"][2] > base["loss"]["class_weights"][2]
    no_rare = _plan(s, _fp(rare={"share": 0.06}, bg={"share": 0.76}))
    assert no_rare["rare_crop_prob"] < base["rare_crop_prob"]
    # a thin class switches blur off; a layered structure switches 90-degree turns off
    assert base["augment"]["blur"] > 0
    assert _plan(s, _fp(rare={"thickness": 3.0}))["augment"]["blur"] == 0
    # with the term on, a fine, line-like class gets skeleton recall; fine round specks
    # do not (it is off as shipped: it lost on nasa-ebc)
    assert P.SKELETON_WEIGHT == 0
    monkeypatch.setattr(P, "SKELETON_WEIGHT", 1.0)
    assert _plan(s, _fp())["loss"]["skeleton_weight"] == 0
    crack = _plan(s, _fp(rare={"thickness": 3.0, "elongation": 40.0}))["loss"]
    assert crack["skeleton_weight"] > 0 and crack["skeleton_classes"] == ["rare"]
    assert _plan(s, _fp(rare={"thickness": 3.0, "elongation": 1.5}))["loss"]["skeleton_weight"] == 0
    monkeypatch.undo()
    assert base["augment"]["rotate90"]
    assert not _plan(s, _fp(mid={"anisotropy": 0.9}))["augment"]["rotate90"]
    # a GPU: larger tiles and batches, the learning rate with the batch, warm-up with steps
    gpu = _plan(s, _fp(), GPU)
    assert gpu["batch_size"] > base["batch_size"] and gpu["lr"] > base["lr"]
    assert gpu["tile_size"] >= base["tile_size"] and gpu["warmup_steps"] > base["warmup_steps"]
    # more validation pixels, or a faster step: validation every more epochs
    few = P.make_plan(s, _fp(), CPU, 0.05, val_pixels=10**6).values["val_every"]
    many = P.make_plan(s, _fp(), CPU, 0.05, val_pixels=10**8).values["val_every"]
    assert many > few >= 1


def test_no_rule_reads_class_names(tmp_path):
    """The same figures under other names give the same plan."""
    s = _setup(tmp_path)
    fp = _fp()
    renamed = copy.deepcopy(fp)
    renamed["classes"] = {f"c{i}": v for i, v in enumerate(fp["classes"].values())}
    d = s.model_dump()
    d["classes"] = [{"name": f"c{i}", "color": c["color"]} for i, c in enumerate(d["classes"])]
    assert _plan(type(s).model_validate(d), renamed) == _plan(s, fp)


def test_explicit_values_win_and_a_run_records_its_plan(demo_params, tmp_path):
    d = json.loads(demo_params.model_dump_json())
    d["train"].update(tile_size="auto", lr="auto", rare_crop_prob=0.1, augment="auto")
    d["train"]["loss"]["class_weights"] = "auto"
    p = parse_params(d)
    index = build_index(p, show_progress=False)
    setup, plan = P.plan_stage(stage_setup(p), index)
    assert set(plan.values) == {"tile_size", "lr", "augment", "loss.class_weights", "loss"}
    assert setup.train.rare_crop_prob == 0.1 and setup.train.batch_size == 2  # explicit
    assert setup.train.tile_size <= 64  # the demo images are 64 px: the tile fits them
    assert setup.train.loss.dice_weight == 1.0 and len(setup.train.loss.class_weights) == 3
    res = train_stage(stage_setup(p), index, progress=False)
    saved = json.loads((p.train.out_dir / "plan.json").read_text())
    assert saved["values"]["tile_size"] == setup.train.tile_size
    assert json.loads((p.train.out_dir / "train_metrics.json").read_text())["plan"] == saved
    assert res.steps == 4
    # nothing auto: no plan, the setup as it is
    plain = stage_setup(demo_params)
    assert P.plan_stage(plain, index) == (plain, None)


def test_plan_cli_prints_yaml_with_reasons(demo_params, tmp_path, capsys):
    import yaml

    from srpu_pipelines.cli import main
    from srpu_pipelines.data.index import write_index

    p = demo_params
    write_index(build_index(p, show_progress=False), p.data.index_path)
    path = tmp_path / "params.yaml"
    d = json.loads(p.model_dump_json())
    d["train"]["tile_size"] = "auto"
    path.write_text(yaml.safe_dump(d))
    assert main(["--params", str(path), "plan", "--fingerprint"]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert doc["fingerprint"]["classes"]["carbon"]["share"] > 0
    for name in (st.name for st in p.stages):
        entry = doc["stages"][name]["plan"]["tile_size"]
        assert entry["value"] % 32 == 0 and "extent" in entry["why"]


def test_a_saved_plan_is_kept_while_its_inputs_are_the_same(demo_params, monkeypatch):
    d = json.loads(demo_params.model_dump_json())
    d["train"].update(tile_size="auto", warmup_steps="auto", budget_s=30.0, max_steps=10**6)
    p = parse_params(d)
    index = build_index(p, show_progress=False)
    fast, slow = P.Device("cpu", "same cpu", 1e5, "t"), P.Device("cpu", "same cpu", 1.0, "t")
    monkeypatch.setattr(P.Device, "of", classmethod(lambda cls, *a: fast))
    _, first = P.plan_stage(stage_setup(p), index)
    monkeypatch.setattr(P.Device, "of", classmethod(lambda cls, *a: slow))  # the clock moved
    _, fresh = P.plan_stage(stage_setup(p), index)
    assert fresh.values["warmup_steps"] < first.values["warmup_steps"]
    _, kept = P.plan_stage(stage_setup(p), index, json.loads(json.dumps(first.as_dict())))
    assert kept.values == first.values
    # another device, other data or other settings: planned again
    other = P.Device("cpu", "another cpu", 1.0, "t")
    monkeypatch.setattr(P.Device, "of", classmethod(lambda cls, *a: other))
    _, again = P.plan_stage(stage_setup(p), index, first.as_dict())
    assert again.values == fresh.values


def test_model_auto_grows_with_the_budget_and_keeps_explicit_fields(tmp_path):
    s = _setup(tmp_path)
    auto = s.model.model_copy(update={"encoder": "auto", "decoder_channels": "auto"})
    fp = _fp()
    chosen = {}
    for budget in (5.0, 10**5):
        tp = s.train.model_copy(update={"budget_s": budget, "max_steps": 10**6})
        chosen[budget], why, est = P.choose_model(auto, tp, fp, GPU, 3)
        assert "steps" in why and set(est["model_steps"]) == {"light", "standard", "large"}
    # a longer budget (or a faster device) affords a larger model; a short one the smallest
    flops = {b: P.train_flops_per_pixel(m.model_dump_json(), 3) for b, m in chosen.items()}
    assert flops[10**5] > flops[5.0]
    assert chosen[10**5].encoder == "resnet34"
    slow, _, _ = P.choose_model(auto, s.train, fp, CPU, 3)
    assert slow.encoder == "resnet18" and slow.decoder_channels == [128, 64, 32, 16, 16]
    # a step budget alone fixes the steps, not the time: the smallest rung
    steps_only = s.train.model_copy(update={"budget_s": None, "max_steps": 10**4})
    m, why, _ = P.choose_model(auto, steps_only, fp, GPU, 3)
    assert m == slow and "step budget" in why
    # an explicit encoder stays; only the decoder is planned
    enc = s.model.model_copy(update={"encoder": "resnet18", "decoder_channels": "auto"})
    tp = s.train.model_copy(update={"budget_s": 10**5, "max_steps": 10**6})
    m, _, _ = P.choose_model(enc, tp, fp, GPU, 3)
    assert m.encoder == "resnet18" and m.decoder_channels == [256, 128, 64, 32, 16]


def test_model_auto_is_one_choice_for_stages_and_mae_and_is_kept(demo_params, monkeypatch):
    from srpu_pipelines.config import pretrain_setup
    from srpu_pipelines.training.pretrain import MaeTask

    d = json.loads(demo_params.model_dump_json())
    d["model"] = "auto"
    d["train"]["budget_s"] = 30.0  # a time budget: the plan weighs the rungs
    p = parse_params(d)
    assert p.model.is_auto and p.model.arch == "unet"
    index = build_index(p, show_progress=False)
    setup, plan = P.plan_stage(stage_setup(p, p.stages[0].name), index)
    assert not setup.model.is_auto and plan.values["model"]["encoder"] == setup.model.encoder
    assert "the largest of" in plan.reasons["model"]
    saved = p.train.out_dir / "model_plan.json"
    assert json.loads(saved.read_text())["value"] == setup.model.model_dump(mode="json")
    # the MAE encoder is the stages' encoder, even once the measured clock has moved
    real = P.Device.of(p.train.device, p.train.precision)
    moved = P.Device(real.kind, real.name, real.gflops * 1e-4, "the clock moved")
    monkeypatch.setattr(P.Device, "of", classmethod(lambda cls, *a: moved))
    mae = MaeTask(pretrain_setup(p), index)
    assert mae.setup.model == setup.model
    last = stage_setup(p, p.stages[-1].name)
    assert P.plan_stage(last, index)[0].model == setup.model
    with pytest.raises(ValueError, match="arch 'fpn' needs explicit sizes"):
        parse_params({**d, "model": {"arch": "fpn", "encoder": "auto"}})


def test_a_cpu_is_planned_at_the_share_of_peak_its_instruction_set_reaches(monkeypatch):
    """fp32 on AVX2 (32 FLOPs/cycle) reaches a larger share of its peak than on AVX-512
    (64), and bfloat16 where it is native the most: the plan's device speed follows."""
    peaks = {}
    for per_cycle, bf16 in ((32, False), (64, False), (64, True)):
        cpu = {
            "cpu": "X",
            "cores": 2,
            "flops_per_cycle_per_core": per_cycle,
            "native_bf16": bf16,
            "fp32_peak_gflops": 2 * per_cycle * 2.0,
        }
        monkeypatch.setattr(P, "cpu_peak", lambda cpu=cpu: cpu)
        dev = P.Device.of("cpu", "auto")
        peaks[(per_cycle, bf16)] = dev.gflops / cpu["fp32_peak_gflops"]
        assert f"{peaks[(per_cycle, bf16)]:.0%} of the {cpu['fp32_peak_gflops']:g}" in dev.how
    assert peaks[(64, False)] < peaks[(32, False)] < peaks[(64, True)]
    assert P.Device.of("cpu", "fp32").gflops == pytest.approx(0.35 * 256)  # bf16 not asked
