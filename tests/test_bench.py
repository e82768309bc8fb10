"""The benchmarks' bookkeeping on tiny data (their figures come from real runs, not tests)."""

import json

import pytest

from srpu_pipelines.bench.common import subset_index
from srpu_pipelines.bench.ssl import bench_ssl
from srpu_pipelines.data.index import build_index


def test_subset_hides_the_other_training_masks(demo_params):
    idx = build_index(demo_params, show_progress=False)
    train = sorted(it["id"] for it in idx["items"] if it["split"] == "train")
    sub = subset_index(idx, {train[0]})
    assert [it["id"] for it in sub["items"] if it["split"] == "train"] == [train[0]]
    pool_ids = {it["id"] for it in sub["pool"]}
    assert set(train[1:]) <= pool_ids and all("mask" not in it for it in sub["pool"])
    # validation and test images stay labelled and never join the pool
    assert not pool_ids & {it["id"] for it in idx["items"] if it["split"] != "train"}


def test_bench_ssl_reports_every_arm_and_k(demo_params, tmp_path):
    res = bench_ssl(
        demo_params,
        ks=[1, 2],
        seeds=1,
        budget_s=None,
        steps=1,
        mae_budget_s=None,
        mae_steps=1,
        work_dir=tmp_path / "bench",
        progress=False,
    )
    assert set(res["table"]) == {"scratch", "mae", "mae_semi"}
    assert set(res["table"]["mae"]) == {"k1", "k2"}
    assert len(res["runs"]) == 6 and all(r["steps"] == 1 for r in res["runs"])
    assert set(res["paired_gain"]) == {"mae-scratch", "mae_semi-scratch"}
    assert res["mae"]["steps"] == 1
    # scored runs leave their figures, not their weights (the MAE encoder stays)
    bench = tmp_path / "bench"
    assert not [p for p in bench.rglob("*.pt") if (bench / "mae") not in p.parents]


def test_bench_al_curves_auc_and_plot(demo_params, tmp_path, capsys):
    from srpu_pipelines.bench.al import bench_al, cut_tiles, merge_results, plot_curves
    from srpu_pipelines.data.masks import MaskCodec

    idx = build_index(demo_params, show_progress=False)
    tiles = cut_tiles(demo_params, idx, tmp_path / "tiles")
    n_train = sum(it["split"] == "train" for it in idx["items"])
    assert len(tiles) == 4 * n_train  # 64 px images, 32 px tiles
    # the oracle's tile mask is the original mask's tile
    t = tiles[1]
    src = next(it for it in idx["items"] if t["id"].startswith(it["id"] + "__"))
    codec = MaskCodec.from_params(demo_params)
    y, x = (int(v) for v in t["name"].rsplit("__y", 1)[1].split("_x"))
    whole = codec.decode_file(src["mask"])
    assert (codec.decode_file(t["mask"]) == whole[y : y + 32, x : x + 32]).all()
    kw = dict(
        seeds=1,
        rounds=2,
        per_round=1,
        initial=2,
        steps=1,
        budget_s=None,
        work_dir=tmp_path / "al",
        arms=("random", "entropy", "typiclust", "auto"),
        progress=False,
    )
    res = bench_al(demo_params, **kw)
    # started again with the same settings: everything comes from the kept results
    curve = tmp_path / "al/seed0/entropy/curve.json"
    stamp = curve.stat().st_mtime_ns
    assert bench_al(demo_params, **kw)["arms"] == res["arms"]
    assert curve.stat().st_mtime_ns == stamp
    assert set(res["arms"]) == {"random", "entropy", "typiclust", "auto"}
    assert res["default_strategy"] == demo_params.active.strategy
    for row in res["arms"].values():
        assert row["labeled"] == [2, 3, 4] and len(row["curve_mean"]) == 3
        assert 0.0 <= row["auc"]["mean"] <= 1.0
    assert len(res["arms"]["entropy"]["paired_auc_gain_vs_random"]) == 1
    # every arm picks its own start from zero labels; no arm labels a tile twice
    tile_ids = {t["id"] for t in tiles}
    starts = {}
    for r in res["runs"]:
        assert [c["labeled"] for c in r["curve"]] == [2, 3, 4]
        picked = [i for c in r["curve"] for i in c["picked"]]
        assert len(picked) == len(set(picked)) == 4 and set(picked) <= tile_ids
        starts[r["arm"]] = tuple(r["curve"][0]["picked"])
    # the cold start: entropy has no model yet and falls back to it; typiclust picks
    # typical tiles of its own; both are deterministic
    again = bench_al(demo_params, **{**kw, "work_dir": tmp_path / "al2", "arms": ("entropy",)})
    assert tuple(again["runs"][0]["curve"][0]["picked"]) == starts["entropy"]
    # no round weights are left behind: a real run would leave GBs of them
    assert not list((tmp_path / "al").rglob("*.pt"))
    plot_curves(res, tmp_path / "al.png")
    with pytest.raises(ValueError, match="--rounds must be >= 1"):
        bench_al(demo_params, **{**kw, "rounds": 0})
    assert (tmp_path / "al.png").stat().st_size > 10_000
    # a seed run by a command of its own merges into the same result as one command over
    # both seeds (which finds both finished and only summarises them)
    res1 = bench_al(demo_params, **{**kw, "seed_list": [1]})
    both = bench_al(demo_params, **{**kw, "seeds": 2})
    legacy = {k: v for k, v in res.items() if k != "full_label_miou_per_seed"}
    merged = merge_results([("s0.json", legacy), ("s1.json", res1)])
    assert merged["seeds"] == both["seeds"] == [0, 1]
    assert merged["arms"] == both["arms"] and merged["runs"] == both["runs"]
    assert merged["full_label_miou"] == both["full_label_miou"]
    assert len(merged["arms"]["entropy"]["paired_auc_gain_vs_random"]) == 2
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        merge_results([("a.json", res), ("b.json", both)])
    with pytest.raises(ValueError, match="b.json has steps_per_round=2"):
        merge_results([("a.json", res), ("b.json", {**res1, "steps_per_round": 2})])
    with pytest.raises(ValueError, match="holds seeds \\[0, 1\\] but no"):
        merge_results([("b.json", {k: v for k, v in both.items() if "per_seed" not in k})])
    with pytest.raises(ValueError, match="x.json is not a `srpu bench al` result"):
        merge_results([("x.json", {"bench": "ssl"})])
    # the command: files in, one JSON out; a missing file is one line naming it
    from srpu_pipelines.cli import main

    for name, r in (("s0.json", res), ("s1.json", res1)):
        (tmp_path / name).write_text(json.dumps(r))
    files = [str(tmp_path / "s0.json"), str(tmp_path / "s1.json")]
    assert main(["bench", "al-merge", *files, "--plot", str(tmp_path / "m.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arms"] == both["arms"] and out["merged_from"] == files
    assert (tmp_path / "m.png").stat().st_size > 10_000
    assert main(["bench", "al-merge", str(tmp_path / "nope.json")]) == 2
    assert "nope.json: file not found" in capsys.readouterr().err


def test_bench_speed_reports_flops_throughput_and_share_of_peak(tiny_params, tmp_path):
    from srpu_pipelines.bench.speed import bench_speed, light_model

    res = bench_speed(
        tiny_params,
        seeds=1,
        steps=2,
        budget_s=None,
        work_dir=tmp_path,
        arms=("default", "light"),
        progress=False,
    )
    host = res["host"]
    assert host["peak_gflops"] > 0 and host["cores"] >= 1 and host["matmul_fp32_gflops"] > 0
    d, light = res["arms"]["default"], res["arms"]["light"]
    assert 0 < light["gflop_per_step"] < d["gflop_per_step"]
    for run in res["runs"]:
        assert run["steps"] == 2 and run["wall_s"] > 0 and 0 < run["pct_of_peak"] < 1000
        assert run["images_per_s"] == pytest.approx(2 * 2 / run["wall_s"], rel=0.02)
    lm = light_model(tiny_params.model)
    assert lm.encoder_depth == 3 and lm.decoder_channels == [16, 8, 8]
    assert not list((tmp_path / "runs").rglob("*.pt"))  # only the figures are kept


FAKE_PEER = """
import json, sys
from pathlib import Path
from PIL import Image
import numpy as np
root = Path(sys.argv[1]); a = sys.argv
n = int(a[a.index("--classes") + 1]); seed = int(a[a.index("--seed") + 1])
steps = int(a[a.index("--steps") + 1]) if "--steps" in a else 0
masks = sorted((root / "test").glob("*_mask.tif"))
seen = sorted(np.unique(np.concatenate([np.array(Image.open(m)).ravel() for m in masks])).tolist())
assert (root / "train").is_dir() and masks and max(seen) < n, seen
r = {"steps": steps, "train_s": 0.1, "per_class_iou": [0.5] * n, "miou": 0.5 + seed / 100}
print(json.dumps(r))
"""


def test_bench_supervised_sets_peer_and_resume(demo_params, tmp_path, monkeypatch):
    import srpu_pipelines.bench.supervised as sup

    peer = tmp_path / "peer.py"
    peer.write_text(FAKE_PEER)
    work = tmp_path / "bench"
    other = demo_params.model_copy(deep=True)
    other.train.out_dir = tmp_path / "other"
    sets = {"a": demo_params, "b": other}
    res = sup.bench_supervised(sets, 2, None, 2, work, peer_script=peer, progress=False)
    assert set(res["sets"]) == {"a", "b"}
    one = res["sets"]["a"]
    assert [r["steps"] for r in one["srpu"]["runs"]] == [2, 2]
    assert [r["steps"] for r in one["peer"]["runs"]] == [2, 2]
    assert one["peer"]["miou"] == {"mean": 0.505, "min": 0.5, "max": 0.51, "range": 0.01}
    assert set(one["srpu"]["per_class_iou"]) == set(demo_params.class_names)
    assert one["srpu_minus_peer_miou"] == round(one["srpu"]["miou"]["mean"] - 0.505, 4)
    assert not list(work.rglob("*.pt"))  # figures stay, weights go
    # a rerun reads every finished run back and trains nothing
    monkeypatch.setattr(sup, "train_stage", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(sup, "run_peer", lambda *a, **k: pytest.fail("peer ran again"))
    again = sup.bench_supervised(sets, 2, None, 2, work, peer_script=peer, progress=False)
    assert again == res
    with pytest.raises(ValueError, match="not both"):
        sup.bench_supervised(sets, 1, 60.0, 2, work, peer_script=peer, progress=False)
    monkeypatch.undo()
    kept = tmp_path / "kept"
    sup.bench_supervised({"a": demo_params}, 1, None, 1, kept, progress=False, keep_weights=True)
    assert [p.name for p in kept.rglob("*.pt")] == ["best.pt"]


def test_cpu_peak_follows_an_instruction_set_cap(monkeypatch):
    """An AVX-512 host run as an AVX2-only one (torch's and oneDNN's/MKL's variables) is
    measured against the AVX2 peak, and a variable left unset or set wide caps nothing."""
    from srpu_pipelines.compute import flops as F

    assert F.isa_cap({}) == (None, "")
    assert F.isa_cap({"ONEDNN_MAX_CPU_ISA": "ALL", "MKL_ENABLE_INSTRUCTIONS": "AVX512"}) == (
        None,
        "",
    )
    cap, why = F.isa_cap({"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert cap == 32 and "ATEN_CPU_CAPABILITY=avx2" in why and "ONEDNN_MAX_CPU_ISA=AVX2" in why
    assert F.isa_cap({"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "AVX2"})[0] == 16

    flags = "fpu sse avx avx2 fma avx512f avx512_bf16 amx_bf16"
    monkeypatch.setattr(
        F, "_cpuinfo", lambda: f"model name : X\nflags : {flags}\ncpu MHz : 2000.0\n"
    )
    monkeypatch.setattr(F, "cpu_clock_ghz", lambda info=None: (2.0, "test"))
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS"):
        monkeypatch.delenv(var, raising=False)
    wide = F.cpu_peak(cores=2)
    assert wide["flops_per_cycle_per_core"] == 64 and wide["fp32_peak_gflops"] == 256.0
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    held = F.cpu_peak(cores=2)
    assert held["flops_per_cycle_per_core"] == 32 and held["fp32_peak_gflops"] == 128.0
    assert "held to 32 FLOPs/cycle by ONEDNN_MAX_CPU_ISA=AVX2" in held["isa"]
