"""srpu quantify: microstructure quantities against shapes with known answers."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from srpu_pipelines.analysis.quantify import (
    Micrograph,
    area_fractions,
    interface_lengths_px,
    mean_ci,
    particles,
    quantify,
    spanning,
    tortuosity,
    triple_points,
)
from srpu_pipelines.analysis.scalebar import draw_scale_bar, length_label, nice_length_nm
from srpu_pipelines.config import QuantifyParams

NAMES = ["matrix", "particle", "pore"]
COLORS = [(0, 0, 255), (255, 0, 0), (0, 255, 0)]


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def test_a_disc_of_known_radius():
    lab = disc((201, 201), 100, 100, 40).astype(np.uint8)
    (p,) = particles(lab, 1, 4, 4)
    assert p["eq_diameter_px"] == pytest.approx(80, rel=0.005) and not p["cut"]
    length = interface_lengths_px(lab, 2)[0, 1]
    assert length == pytest.approx(2 * math.pi * 40, rel=0.02)  # +1.3 % measured
    assert area_fractions(lab, 2)[1] == pytest.approx(math.pi * 40**2 / 201**2, rel=0.01)


@pytest.mark.parametrize("square", [4, 8, 16, 32])
def test_a_checkerboards_interface_length_is_exact(square):
    yy, xx = np.mgrid[:128, :128]
    lab = ((yy // square + xx // square) % 2).astype(np.uint8)
    lines = 128 // square - 1  # inner grid lines in each direction, 128 px each
    assert interface_lengths_px(lab, 2)[0, 1] == pytest.approx(2 * 128 * lines, rel=2e-3)


@pytest.mark.parametrize("degrees", [0, 10, 30, 45, 60])
def test_a_straight_boundary_at_any_angle(degrees):
    t = math.radians(degrees)
    yy, xx = np.mgrid[:201, :201]
    lab = ((yy - 100) * math.cos(t) - (xx - 100) * math.sin(t) > 0).astype(np.uint8)
    true = 200 / max(abs(math.cos(t)), abs(math.sin(t)))
    assert interface_lengths_px(lab, 2)[0, 1] == pytest.approx(true, rel=0.01)


def test_interfaces_per_pair_and_triple_points():
    lab = np.zeros((60, 60), np.uint8)
    lab[:, 30:] = 1
    lab[30:, :30] = 2  # a T: three 30 px interfaces meeting at one point
    inter = interface_lengths_px(lab, 3)
    for i, j in [(0, 1), (1, 2), (0, 2)]:
        assert inter[i, j] == pytest.approx(30, abs=1.0)
    assert triple_points(lab, 3) == 1
    lab[0, 0] = 255  # unlabelled pixels make no interface
    assert interface_lengths_px(lab, 3)[0, 1] == pytest.approx(inter[0, 1], abs=0.01)


def test_particles_cut_by_the_edge_or_unlabelled_pixels_are_marked():
    lab = np.zeros((50, 50), np.uint8)
    lab[disc(lab.shape, 25, 25, 5)] = 1
    lab[disc(lab.shape, 0, 10, 4)] = 1  # cut by the top edge
    lab[40:44, 40:44] = 1
    lab[44:, :] = 255  # the square touches the unlabelled band
    lab[5, 45] = 1  # noise below min_px
    ps = sorted(particles(lab, 1, 4, 4), key=lambda p: p["area_px"])
    assert [p["cut"] for p in ps] == [True, True, False]


def test_straight_channels_have_tortuosity_one_and_percolate_one_way():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 0::4] = 1
    lab[:, 1::4] = 1  # vertical channels, 2 px wide
    assert spanning(lab, 1, 4) == {
        "spanning_share": 1.0,
        "percolates_x": False,
        "percolates_y": True,
    }
    y = tortuosity(lab, 1, "y", 512, 20000)
    assert y["tau"] == pytest.approx(1.0, abs=0.01) and y["converged"]
    assert tortuosity(lab, 1, "x", 512, 20000)["tau"] is None


def test_a_winding_path_is_more_tortuous():
    lab = np.zeros((64, 64), np.uint8)
    lab[:, 4:8] = 1  # a straight channel ...
    zig = np.zeros((64, 64), np.uint8)
    for k in range(0, 64, 16):  # ... and a zig-zag one of the same width
        zig[k : k + 4, 4:60] = 1
        zig[k : k + 16, (4 if k % 32 else 56) : (8 if k % 32 else 60)] = 1
    assert spanning(zig, 1, 4)["percolates_y"]
    tau = tortuosity(zig, 1, "y", 512, 20000)["tau"]
    assert tau > 2 * tortuosity(lab, 1, "y", 512, 20000)["tau"]


def test_confidence_interval_over_images():
    ci = mean_ci([0.2, 0.3, 0.4], 0.95)
    half = 4.302653 * 0.1 / math.sqrt(3)  # t(0.975, 2) * sd / sqrt(n)
    assert ci["mean"] == pytest.approx(0.3)
    assert ci["ci"] == pytest.approx([0.3 - half, 0.3 + half], abs=1e-6)  # 6 decimals kept
    assert mean_ci([0.5], 0.95)["ci"] is None


def _micrographs():
    out = []
    for i, (ds, nm) in enumerate([("a", 50.0), ("a", 50.0), ("b", None)]):
        lab = np.zeros((96, 96), np.uint8)
        for cy, cx in [(20, 20), (20, 70), (70, 30), (72, 72)]:
            lab[disc(lab.shape, cy, cx, 8 + i)] = 1
        lab[:, 45:48] = 2  # a straight pore channel top to bottom
        out.append(Micrograph(f"{ds}/img{i}", ds, lab, nm))
    return out


def test_quantify_writes_tables_plots_and_units(tmp_path):
    qp = QuantifyParams(tortuosity_max_px=64)
    doc = quantify(_micrographs(), NAMES, COLORS, qp, tmp_path)
    a, b = doc["per_dataset"]["a"], doc["per_dataset"]["b"]
    assert a["length_unit"] == "um" and b["length_unit"] == "px" and "all" in doc["per_dataset"]
    # particles: 4 discs of radius 8 and 9 px in 'a' -> diameters 0.8 / 0.9 um at 50 nm
    pa = a["particles"]["particle"]
    assert pa["count"] == 8 and pa["sized"] == 8
    assert pa["eq_diameter_um"]["median"] == pytest.approx(0.85, rel=0.05)
    assert b["particles"]["particle"]["eq_diameter_px"]["median"] == pytest.approx(20, rel=0.05)
    # interface density in 1/um: the channel's two walls, 96 px each, per 96 x 96 px
    walls = 2 * 96 * 0.05 / (96 * 96 * 0.05**2)
    assert a["interface_density"]["matrix|pore"] == pytest.approx(walls, rel=0.02)
    assert a["interface_density_unit"] == "1/um"
    assert a["connectivity"]["pore"]["percolates_y_share"] == 1.0
    assert a["connectivity"]["pore"]["percolates_x_share"] == 0.0
    assert a["tortuosity"]["pore"]["y"]["mean"] == pytest.approx(1.0, abs=0.01)
    assert a["tortuosity"]["particle"]["y"]["not_percolating"] == 2
    frac = a["fractions"]["pore"]
    assert frac["mean"] == pytest.approx(3 / 96, abs=1e-6) and frac["n"] == 2
    files = {p.name for p in tmp_path.iterdir()}
    assert {"quantify.json", "per_image.csv", "particles.csv", "fractions.png"} <= files
    assert {"sizes_a.png", "sizes_b.png", "sizes_all.png"} <= files
    assert Image.open(tmp_path / "fractions.png").size[0] > 100
    rows = (tmp_path / "particles.csv").read_text().splitlines()
    assert rows[0].startswith("id,dataset,phase,area_px")
    # per image: 4 particles, the matrix in 2 halves, 1 pore channel
    assert len(rows) == 1 + 3 * 7 and sum(",particle," in r for r in rows) == 12
    # the same masks again: the same bytes
    before = {f: (tmp_path / f).read_bytes() for f in ("quantify.json", "per_image.csv")}
    quantify(_micrographs(), NAMES, COLORS, qp, tmp_path)
    assert before == {f: (tmp_path / f).read_bytes() for f in before}
    assert json.loads(before["quantify.json"])["classes"] == NAMES


def test_scale_bar_length_and_drawing():
    assert nice_length_nm(10.0, 1000) == 2000.0  # a fifth of 10 um is 2 um
    assert nice_length_nm(3.0, 1024) == 500.0
    assert length_label(2000.0) == "2 µm" and length_label(500.0) == "500 nm"
    assert length_label(1.5e6) == "1.5 mm"
    rgb = np.full((200, 400, 3), 128, np.uint8)
    out, info = draw_scale_bar(rgb, 25.0, bottom=180)  # 400 px of 25 nm = 10 um wide
    assert info == {"length_nm": 2000.0, "pixels": 80, "label": "2 µm"}
    white = np.all(out == 255, axis=-1)
    rows = np.flatnonzero(white.sum(1) >= 80)
    assert rows.size and rows.max() < 180  # above the data bar
    assert white[rows[0]].sum() == 80  # the bar is exactly 2 um long
    assert np.array_equal(out[180:], rgb[180:])
    same, none = draw_scale_bar(rgb, None)
    assert none is None and same is rgb


NASA = Path(__file__).resolve().parents[2] / "shared/data/nasa-super"


@pytest.mark.skipif(not NASA.is_dir(), reason=f"real data not here: {NASA} is absent")
def test_quantify_on_nasa_super_test_masks(tmp_path, monkeypatch):
    """The CLI on a real set's test masks: every table and plot, per sub-dataset."""
    from srpu_pipelines.cli import main

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    sets = [
        f"data.index_path={tmp_path / 'index.json'}",
        f"quantify.out_dir={tmp_path / 'q'}",
        "quantify.tortuosity_max_px=96",
        "tracking.enabled=false",
    ]
    args = ["-q", "--params", "bench/nasa-super.yaml", *sum([["--set", s] for s in sets], [])]
    assert main([*args, "index"]) == 0
    assert main([*args, "quantify"]) == 0
    doc = json.loads((tmp_path / "q/quantify.json").read_text())
    assert doc["per_image"] and set(doc["classes"]) >= {"tertiary"}
    for s in doc["per_dataset"].values():
        assert sum(f["mean"] for f in s["fractions"].values()) == pytest.approx(1.0, abs=1e-4)
        assert s["interface_density"] and s["connectivity"] and s["tortuosity"]
        assert all(p["count"] >= 0 for p in s["particles"].values())
    assert (tmp_path / "q/fractions.png").is_file()
    assert list((tmp_path / "q").glob("sizes_*.png"))


def test_run_quantify_on_the_demo_labels_logs_to_the_tracker(demo_params):
    """The step both doors share: the demo's bar is left out, MLflow gets figures and files."""
    from srpu_pipelines.data.index import load_index
    from srpu_pipelines.pipeline.steps import run_index, run_quantify
    from srpu_pipelines.resources.tracking import RecordingTracker

    p = demo_params
    p.quantify.splits = ["train", "val", "test"]
    p.quantify.tortuosity_max_px = 32
    run_index(p, progress=False)
    tracker = RecordingTracker()
    doc = run_quantify(p, tracker, progress=False)
    index = load_index(p.data.index_path)
    assert len(doc["per_image"]) == len(index["items"])
    bar = p.demo.info_bar
    for r in doc["per_image"]:
        assert r["height"] == p.demo.size - bar  # cut above the bar: none of it measured
        assert r["sample_px"] <= (p.demo.size - bar) * p.demo.size
    (run,) = tracker.runs.values()
    assert run["name"] == "quantify" and run["tags"]["srpu.quantify.source"] == "labels"
    metrics = run["metrics"][0][1]
    assert "quantify.a.fraction.carbon" in metrics and "quantify.all.fraction.carbon" in metrics
    assert {Path(a).name for a, _ in run["artifacts"]} >= {"quantify.json", "fractions.png"}
