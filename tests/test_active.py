"""Active learning: strategies on constructed probabilities with known answers, selection
and its exclusions, stale-score recomputation, round folders and what comes back."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from srpu_pipelines.active_learning import uncertainty as U
from srpu_pipelines.active_learning.rounds import awaiting_ids, new_labels, round_folders
from srpu_pipelines.active_learning.scoring import COLD_KEY, score_pool
from srpu_pipelines.active_learning.selection import (
    Candidate,
    candidates,
    combined_scores,
    k_center_greedy,
    rank_normalise,
    select,
)
from srpu_pipelines.config import parse_params
from srpu_pipelines.data.discovery import tile_name
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.models.checkpoint import model_config, save_checkpoint
from srpu_pipelines.models.factory import model_from_params
from srpu_pipelines.pipeline.active import run_score, run_select
from srpu_pipelines.pipeline.steps import final_dir, run_index
from tests.conftest import color_mask, save, tiny_params_dict


def _probs(*columns: list[float]) -> np.ndarray:
    """(C, 1, N) probabilities, one column per pixel."""
    return np.array(columns, np.float32).T[:, None, :]


# -- strategies --------------------------------------------------------------------------
def test_pixel_strategies_known_values():
    p = _probs([1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.6, 0.3, 0.1])
    ent = U.entropy_map(p)[0]
    assert ent[0] == pytest.approx(1.0, abs=1e-6)
    assert ent[1] == pytest.approx(0.0, abs=1e-6)
    h = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1)) / math.log(3)
    assert ent[2] == pytest.approx(h, abs=1e-5)
    lc = U.least_confidence_map(p)[0]
    assert lc == pytest.approx([1.0, 0.0, 0.4 * 3 / 2], abs=1e-6)
    mg = U.margin_map(p)[0]
    assert mg == pytest.approx([1.0, 0.0, 0.7], abs=1e-6)


def test_variance_is_zero_for_agreeing_members_and_one_for_opposite_ones():
    same = np.stack([_probs([0.7, 0.3])] * 3)  # (M, C, 1, 1)
    assert U.variance_map(None, U.member_variance(same))[0, 0] == pytest.approx(0.0)
    opposite = np.stack([_probs([1.0, 0.0]), _probs([0.0, 1.0])])
    assert U.variance_map(None, U.member_variance(opposite))[0, 0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="ensemble members"):
        U.variance_map(_probs([0.5, 0.5]), None)


def test_boundary_mask_marks_pixels_next_to_another_class():
    labels = np.zeros((4, 8), np.int64)
    labels[:, 4:] = 1
    b = U.boundary_mask(labels, width=1)
    assert b[:, 3:5].all() and not b[:, :3].any() and not b[:, 5:].any()
    assert not U.boundary_mask(np.zeros((5, 5), np.int64), 2).any()


def test_aggregations_mean_topk_and_class_balanced():
    # 90 pixels of class 0 at 0.1, 10 of (rare) class 1 at 0.9
    values = np.array([0.1] * 90 + [0.9] * 10, np.float32).reshape(10, 10)
    labels = np.array([0] * 90 + [1] * 10).reshape(10, 10)
    a = U.aggregate(values, np.ones((10, 10), bool), labels, 2, topk_fraction=0.1)
    assert a["mean"] == pytest.approx(0.18)
    assert a["topk"] == pytest.approx(0.9)
    assert a["class_balanced"] == pytest.approx(0.5)  # the rare phase counts as much
    empty = U.aggregate(values, np.zeros((10, 10), bool), labels, 2, 0.1)
    assert empty == {"mean": 0.0, "topk": 0.0, "class_balanced": 0.0}


def test_score_probabilities_ranks_images_and_tiles():
    sure = np.zeros((3, 8, 8), np.float32)
    sure[0] = 1.0
    unsure = sure.copy()
    unsure[:, :4, 4:] = 1 / 3  # one unsure quarter, top right
    strategies = ["entropy", "margin", "boundary_entropy"]
    tiles = U.tile_grid(8, 8, 4)
    assert tiles == [(0, 0, 4, 4), (0, 4, 4, 4), (4, 0, 4, 4), (4, 4, 4, 4)]
    a = U.score_probabilities(sure, None, strategies, 1, 0.1, tiles)
    b = U.score_probabilities(unsure, None, strategies, 1, 0.1, tiles)
    assert a["image"]["entropy"]["mean"] == pytest.approx(0.0, abs=1e-6)
    assert b["image"]["entropy"]["mean"] == pytest.approx(0.25, abs=1e-5)
    tile_means = [t["scores"]["entropy"]["mean"] for t in b["tiles"]]
    assert int(np.argmax(tile_means)) == 1 and tile_means[1] == pytest.approx(1.0, abs=1e-5)
    assert a["image"]["boundary_entropy"]["mean"] == 0.0  # one class: no boundary
    # expected class shares (strategy rare): the mean probabilities, per tile and image
    assert a["class_probs"] == [1.0, 0.0, 0.0]
    assert b["tiles"][1]["class_probs"] == pytest.approx([1 / 3] * 3, abs=1e-3)
    assert b["class_probs"] == pytest.approx([0.75 + 0.25 / 3, 0.25 / 3, 0.25 / 3], abs=1e-3)


def test_tile_grid_covers_odd_sizes_without_overlap():
    tiles = U.tile_grid(70, 100, 32)
    count = np.zeros((70, 100), int)
    for y, x, h, w in tiles:
        count[y : y + h, x : x + w] += 1
    assert (count == 1).all()  # every pixel in exactly one tile
    assert {h for _, _, h, _ in tiles} == {32, 38} and {w for *_, w in tiles} == {32, 36}
    assert U.tile_grid(20, 50, 32) == [(0, 0, 20, 32), (0, 32, 20, 18)]
    assert U.tile_grid(64, 64, 32) == [
        (0, 0, 32, 32),
        (0, 32, 32, 32),
        (32, 0, 32, 32),
        (32, 32, 32, 32),
    ]


def test_benchmark_arms_are_the_registered_strategies():
    # AL_ARMS is spelled out in config so that the CLI lists it without importing torch
    from srpu_pipelines.active_learning import AL_ARMS, DEFAULT_AL_ARMS
    from srpu_pipelines.active_learning.strategies import REGISTRY

    assert tuple(REGISTRY) == AL_ARMS
    assert set(U.STRATEGIES) <= set(AL_ARMS)  # one arm per uncertainty score
    assert set(DEFAULT_AL_ARMS) <= set(AL_ARMS) and len(DEFAULT_AL_ARMS) <= 6


def test_unknown_strategy_and_weights_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match="active.strategies.*valid: entropy"):
        parse_params(tiny_params_dict(tmp_path, **{"active.strategies": ["entropyy"]}))
    with pytest.raises(ValueError, match="active.*not computed"):
        parse_params(
            tiny_params_dict(
                tmp_path,
                **{"active.weights": {"margin": 1.0}},
                **{"active.strategies": ["entropy"]},
            )
        )
    with pytest.raises(ValueError, match="need an ensemble"):
        parse_params(tiny_params_dict(tmp_path, **{"active.ensemble.method": "none"}))


# -- selection on constructed candidates ---------------------------------------------------
def _cand(i: int, scores: dict[str, float], emb: list[float]) -> Candidate:
    return Candidate(
        f"d/img{i}",
        f"d/img{i}",
        "d",
        f"img{i}",
        f"img{i}.png",
        None,
        scores,
        np.array(emb, np.float64),
    )


def test_rank_normalise_and_weighted_combination():
    assert rank_normalise(np.array([3.0, 1.0, 2.0])) == pytest.approx([1.0, 0.0, 0.5])
    cands = [
        _cand(0, {"entropy": 0.9, "margin": 0.1}, [0, 0]),
        _cand(1, {"entropy": 0.5, "margin": 0.5}, [0, 1]),
        _cand(2, {"entropy": 0.1, "margin": 0.9}, [1, 0]),
    ]
    sc = {s: np.array([c.scores[s] for c in cands]) for s in ("entropy", "margin")}
    assert combined_scores(sc, {"entropy": 1.0}, 3) == pytest.approx([1.0, 0.5, 0.0])
    assert combined_scores(sc, {"entropy": 1.0, "margin": 3.0}, 3) == pytest.approx(
        [0.25, 0.5, 0.75]
    )
    assert not combined_scores(sc, {}, 3).any()


def _blobs(sizes, centres, spread=0.05, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            np.asarray(c, float) + rng.normal(0, spread, (n, len(c)))
            for n, c in zip(sizes, centres, strict=True)
        ]
    )


def _pool(emb, k, centres=None, scores=None, labeled=0, missing=(), **active):
    from srpu_pipelines.active_learning.strategies import LabelState, Pool
    from srpu_pipelines.config import ActiveParams

    return Pool(
        ids=[f"t{i:03d}" for i in range(len(emb))],
        scores=scores or {},
        emb=emb,
        centres=np.zeros((0, emb.shape[1])) if centres is None else centres,
        k=k,
        seed=0,
        state=LabelState(labeled, tuple(missing)),
        active=ActiveParams(**active),
    )


def test_registry_looks_strategies_up_and_names_the_valid_ones(tmp_path):
    from srpu_pipelines.active_learning.strategies import REGISTRY, get_strategy

    assert get_strategy("typiclust").name == "typiclust"
    with pytest.raises(KeyError, match="unknown selection strategy 'typical'.*typiclust"):
        get_strategy("typical")
    with pytest.raises(ValueError, match="active.strategy.*valid: random"):
        parse_params(tiny_params_dict(tmp_path, **{"active.strategy": "typical"}))
    with pytest.raises(ValueError, match="active.*score that is not computed"):
        parse_params(
            tiny_params_dict(
                tmp_path,
                **{
                    "active.strategy": "margin",
                    "active.strategies": ["entropy"],
                    "active.weights": {"entropy": 1.0},
                },
            )
        )
    assert all(cls.description for cls in REGISTRY.values())


def test_typiclust_takes_typical_points_of_the_largest_uncovered_clusters():
    from srpu_pipelines.active_learning.strategies import get_strategy

    # a big cluster, a middle one, a small one; nothing labelled
    emb = _blobs([30, 15, 6], [[0, 0], [5, 0], [0, 5]])
    rows = get_strategy("typiclust")(_pool(emb, 2)).rows
    assert sorted(r // 30 if r < 30 else 1 + (r >= 45) for r in rows) == [0, 1]
    # the pick in the big cluster is a dense one: near its centre, not an outlier
    big = [r for r in rows if r < 30][0]
    assert np.linalg.norm(emb[big] - emb[:30].mean(0)) < 0.08
    # the big cluster is labelled already: the next pick covers another one
    rows = get_strategy("typiclust")(_pool(emb, 1, centres=emb[:1].copy())).rows
    assert rows[0] >= 30


def test_probcover_covers_each_cluster_once_then_elsewhere():
    from srpu_pipelines.active_learning.strategies import get_strategy, purity_radius

    emb = _blobs([20, 20, 20], [[0, 0], [4, 0], [0, 4]])
    delta = purity_radius(emb, 0, 0.95)
    assert 0.05 < delta < 3.9  # balls inside a cluster (they are 4 apart), not across
    rows = get_strategy("probcover")(_pool(emb, 3)).rows
    assert sorted(r // 20 for r in rows) == [0, 1, 2]
    rows = get_strategy("probcover")(_pool(emb, 2, centres=emb[:2].copy())).rows
    assert 0 not in [r // 20 for r in rows]  # cluster 0 is covered by the labels


def test_rare_seeks_what_the_labels_lack_one_pick_per_cluster():
    from srpu_pipelines.active_learning.strategies import LabelState, get_strategy

    emb = _blobs([10, 10, 10], [[0, 0], [4, 0], [0, 4]])
    probs = np.zeros((30, 3))
    probs[:10] = [0.9, 0.1, 0.0]  # cluster 0: background
    probs[10:20] = [0.2, 0.8, 0.0]  # cluster 1: oxide
    probs[20:] = [0.6, 0.39, 0.01]  # cluster 2: a little crack
    probs[25] = [0.5, 0.45, 0.05]  # the likeliest crack of all

    def pool(k, pixels, **active):
        p = _pool(emb, k, scores={"entropy": np.zeros(30)}, labeled=4, **active)
        p.state = LabelState(4, (), tuple(pixels))
        p.class_probs, p.pixels = probs, np.full(30, 100.0)
        return p

    # no crack pixel labelled yet: the tile likeliest to hold crack comes first
    c = get_strategy("rare")(pool(1, [300.0, 100.0, 0.0]))
    assert c.rows == [25] and "rare" in c.how and c.combined[25] == 1.0
    # the needs move within a batch: one pick per cluster, and the next picks go to
    # what is then scarcest (oxide before background here)
    rows = get_strategy("rare")(pool(3, [300.0, 100.0, 0.0], rare_clusters=1.0)).rows
    assert rows[0] == 25 and [r // 10 for r in rows] == [2, 1, 0]
    # labels short of background (the picks so far held little): it is sought, not oxide
    rows = get_strategy("rare")(pool(1, [10.0, 1000.0, 50.0])).rows
    assert rows[0] < 10
    # a candidate's crack share raised: it overtakes the others
    probs[3] = [0.8, 0.1, 0.1]
    assert get_strategy("rare")(pool(1, [300.0, 100.0, 0.0])).rows == [3]
    # no predictions yet (a cold start): typiclust
    cold = get_strategy("rare")(_pool(emb, 3))
    assert "typiclust" in cold.how.lower() and sorted(r // 10 for r in cold.rows) == [0, 1, 2]


def test_auto_is_typical_first_then_uncertain():
    from srpu_pipelines.active_learning.strategies import get_strategy

    emb = _blobs([10, 10], [[0, 0], [3, 0]])
    ent = np.linspace(0, 1, 20)  # the last rows (cluster 1) most uncertain
    scores = {"entropy": ent, "boundary_margin": ent, "variance": ent}
    kw = dict(scores=scores, auto_uncertainty_after=4, diversity="none")
    early = get_strategy("auto")(_pool(emb, 2, labeled=2, **kw))
    assert "typiclust" in early.how.lower() and sorted(r // 10 for r in early.rows) == [0, 1]
    unseen = get_strategy("auto")(_pool(emb, 2, labeled=9, missing=(2,), **kw))
    assert "classes [2]" in unseen.how
    late = get_strategy("auto")(_pool(emb, 2, labeled=9, **kw))
    assert late.rows == [19, 18] and "uncertain" not in late.how.lower()
    # a score strategy without scores (no model yet) falls back to the cold start
    cold = get_strategy("entropy")(_pool(emb, 2))
    assert "cold start" in cold.how and sorted(r // 10 for r in cold.rows) == [0, 1]


def test_coreset_spreads_over_clusters():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [10, 0], [0, 10]], float)
    emb = np.concatenate([c + rng.normal(0, 0.1, (5, 2)) for c in centres])
    picks = k_center_greedy(emb, 3, first=0)
    assert sorted(p // 5 for p in picks) == [0, 1, 2]


def test_select_top_score_diverse_random_and_cold(tiny_params):
    p = tiny_params.model_copy(deep=True)
    p.active.batch_size = 2
    p.active.strategy = "weighted"  # the weights and the diversity step under test
    # two near-identical very uncertain images, one a little less uncertain elsewhere
    cands = [
        _cand(0, {"entropy": 0.90}, [0.0, 0.0]),
        _cand(1, {"entropy": 0.89}, [0.0, 0.01]),
        _cand(2, {"entropy": 0.50}, [5.0, 5.0]),
        _cand(3, {"entropy": 0.10}, [5.0, 5.1]),
    ]
    p.active.weights = {"entropy": 1.0}
    p.active.diversity = "none"
    assert [s["id"] for s in select(p, cands, cold=False, seed=0)] == ["d/img0", "d/img1"]
    p.active.diversity = "coreset"
    p.active.candidate_factor = 1.5  # the top 3
    picked = [s["id"] for s in select(p, cands, cold=False, seed=0)]
    assert picked == ["d/img0", "d/img2"]  # the second is diverse, not the near-twin
    p.active.weights = {}
    p.active.diversity = "none"
    r1 = [s["id"] for s in select(p, cands, cold=False, seed=1)]
    assert r1 == [s["id"] for s in select(p, cands, cold=False, seed=1)]  # seeded
    cold = select(p, cands, cold=True, seed=0)
    assert len({s["id"][-1] in "01" for s in cold}) == 2  # one from each appearance cluster


# -- scoring, stale records, rounds ------------------------------------------------------
def _random_champion(p) -> Path:
    torch.manual_seed(0)
    model = model_from_params(p.model, p.num_classes)
    ckpt = final_dir(p) / "best.pt"
    save_checkpoint(ckpt, model, model_config(p))
    return ckpt


@pytest.fixture
def al_params(tmp_path):
    from srpu_pipelines.data.demo import generate_demo

    d = tiny_params_dict(
        tmp_path,
        **{"demo.pool_per_dataset": 3},
    )
    p = parse_params(d)
    generate_demo(p)
    run_index(p, progress=False)
    return p


def test_scores_are_kept_until_the_model_or_the_image_changes(al_params):
    from srpu_pipelines.data.index import load_index

    p = al_params
    ckpt = _random_champion(p)
    index = load_index(p.data.index_path)
    n = len(index["pool"]) + len(index["items"])  # labelled images: for their embeddings
    first = score_pool(p, index, ckpt, "m/v1", progress=False)
    assert (first["computed"], first["kept"]) == (n, 0)
    summary = (Path(p.active.out_dir) / "scores/summary.json").read_bytes()
    again = score_pool(p, index, ckpt, "m/v1", progress=False)
    assert (again["computed"], again["kept"]) == (0, n)
    assert (Path(p.active.out_dir) / "scores/summary.json").read_bytes() == summary
    # one pool image changes content: only it is recomputed
    changed = Path(index["pool"][0]["image"])
    arr = np.asarray(__import__("PIL.Image").Image.open(changed)).copy()
    save(changed, 255 - arr)
    index = run_index(p, progress=False)["index"]
    third = score_pool(p, index, ckpt, "m/v1", progress=False)
    assert (third["computed"], third["kept"]) == (1, n - 1)
    # a new champion makes every score stale
    fourth = score_pool(p, index, ckpt, "m/v2", progress=False)
    assert (fourth["computed"], fourth["kept"]) == (n, 0)
    rec = first["images"][0]
    assert set(rec["scores"]) == set(p.active.strategies)
    # without core-set nothing reads the labelled images' embeddings: only the pool
    q = p.model_copy(deep=True)
    q.active.strategy, q.active.diversity = "weighted", "none"
    fifth = score_pool(q, index, ckpt, "m/v3", progress=False)
    assert (fifth["computed"], fifth["kept"]) == (len(index["pool"]), 0)


def test_the_data_bar_is_never_scored_nor_tiled(al_params):
    from srpu_pipelines.active_learning.scoring import load_record
    from srpu_pipelines.data.index import load_index

    p = al_params
    index = load_index(p.data.index_path)
    bar = p.demo.info_bar
    assert {it["data_bar_rows"] for it in index["pool"]} == {bar}  # found in the pixels
    score_pool(p, index, _random_champion(p), "m/v1", progress=False)
    for it in index["pool"]:
        rec = load_record(p, it["id"])
        assert rec["data_bar_rows"] == bar and rec["height"] == it["height"]
        assert max(t["y"] + t["h"] for t in rec["tiles"]) == it["height"] - bar


def test_coreset_wants_the_labelled_images_scored(al_params):
    # scored without core-set (labelled images skipped), selected with it: say so, do
    # not spread picks blind to what is labelled
    p = al_params
    _random_champion(p)
    q = p.model_copy(deep=True)
    q.active.strategy, q.active.diversity = "weighted", "none"
    run_score(q, None, progress=False)
    with pytest.raises(ValueError, match=r"image\(s\) have no scores .* run `srpu score`"):
        run_select(p, None)
    assert run_select(q, None)["new"]  # without core-set the pool's scores are enough


def test_round_folder_exclusions_and_returning_masks(al_params):
    from srpu_pipelines.data.index import load_index

    p = al_params
    _random_champion(p)
    run_score(p, None, progress=False)
    r1 = run_select(p, None)
    assert r1["new"] and r1["round"] == 1
    sel = r1["summary"]["selected"]
    assert len(sel) == 2 and [s["rank"] for s in sel] == [1, 2]
    codec = MaskCodec.from_params(p)
    for s in sel:
        assert Path(s["image_file"]).is_file()
        mask = codec.decode_file(s["mask_file"])  # valid colours, full size
        assert mask.shape == (64, 64)
        bar = p.demo.info_bar  # the data bar: 'not sample' in the mask to correct
        assert s["data_bar_rows"] == bar and (mask[-bar:] == 255).all()
        assert (mask[:-bar] != 255).all()
        assert Path(s["uncertainty_file"]).is_file()
        assert set(s["scores"]) == set(p.active.strategies)
        assert s["id"] in {it["id"] for it in load_index(p.data.index_path)["pool"]}
    # same model, same labels: the same round, nothing written
    again = run_select(p, None)
    assert not again["new"] and again["round"] == 1 and len(round_folders(p)) == 1
    index = load_index(p.data.index_path)
    assert awaiting_ids(p, index) == {s["id"] for s in sel}
    # the person corrects the first item and drops image + mask into the labelled folder
    first = sel[0]
    labeled = Path(next(d.labeled for d in p.data.datasets if d.name == first["dataset"]))
    shutil.copy(first["image_file"], labeled / Path(first["image_file"]).name)
    shutil.copy(first["mask_file"], labeled / Path(first["mask_file"]).name)
    pairs, changed, problems = new_labels(p, index)
    assert [x.id for x in pairs] == [first["id"]] and changed == [] and problems == []
    before = {it["id"]: it["split"] for it in load_index(p.data.index_path)["items"]}
    run_index(p, progress=False)
    index = load_index(p.data.index_path)
    assert first["id"] in {it["id"] for it in index["items"]}
    # the corrected pick trains; val and test are the same images as before the round
    after = {it["id"]: it["split"] for it in index["items"]}
    assert after[first["id"]] == "train"
    assert {k for k, v in after.items() if v != "train"} == {
        k for k, v in before.items() if v != "train"
    }
    assert first["id"] not in {it["id"] for it in index["pool"]}
    r2 = run_select(p, None)  # new labels: a new round, without anything picked before
    assert r2["new"] and r2["round"] == 2
    assert not {s["id"] for s in r2["summary"]["selected"]} & {s["id"] for s in sel}


def test_partial_and_invalid_drops_are_reported(al_params):
    from srpu_pipelines.data.index import load_index

    p = al_params
    labeled = Path(p.data.datasets[0].labeled)
    save(labeled / "orphan_mask.png", color_mask(np.zeros((64, 64), np.uint8)))
    save(labeled / "small.png", np.zeros((64, 64), np.uint8))
    save(labeled / "small_mask.png", color_mask(np.zeros((32, 32), np.uint8)))
    bad = color_mask(np.zeros((64, 64), np.uint8))
    bad[0, 0] = (12, 34, 56)
    save(labeled / "odd colour.png", np.zeros((64, 64), np.uint8))
    save(labeled / "odd colour_mask.png", bad)
    pairs, changed, problems = new_labels(p, load_index(p.data.index_path))
    assert pairs == [] and changed == []
    text = "\n".join(str(x) for x in problems)
    assert "orphan_mask.png: mask without an image" in text
    assert "small_mask.png: mask size 32x32 differs" in text
    assert "odd colour_mask.png" in text


def test_cold_start_without_a_model_and_tiles_as_units(al_params):
    p = al_params.model_copy(deep=True)
    out = run_score(p, None, progress=False)
    assert out["model_key"] == COLD_KEY
    r = run_select(p, None)
    assert r["summary"]["cold_start"] and len(r["summary"]["selected"]) == 2
    assert all("mask_file" not in s for s in r["summary"]["selected"])  # paint from scratch
    # tiles: ids name the tile; the image file is the 32 px crop
    p.active.unit = "tile"
    p.active.out_dir = Path(p.active.out_dir).with_name("active_tiles")
    _random_champion(p)
    run_score(p, None, progress=False)
    r = run_select(p, None)
    s = r["summary"]["selected"][0]
    y, x, h, w = s["box"]
    # tiles cover the 56 sample rows above the 8-row data bar: 32 + 24
    assert s["id"] == tile_name(s["image_id"], y, x) and (h, w) in {(32, 32), (24, 32)}
    assert y + h <= 64 - p.demo.info_bar
    from srpu_pipelines.data.imageio import read_raw

    assert read_raw(s["image_file"]).shape == (h, w)
    assert MaskCodec.from_params(p).decode_file(s["mask_file"]).shape == (h, w)
    # a labelled tile excludes itself and its whole image from image-unit selection
    from srpu_pipelines.data.index import load_index

    index = load_index(p.data.index_path)
    index["items"].append({**index["items"][0], "id": s["id"]})
    cands, _, _ = candidates(p, index, r["summary"]["model_key"], set())
    assert s["id"] not in {c.id for c in cands}
    p.active.unit = "image"
    cands, _, _ = candidates(p, index, r["summary"]["model_key"], set())
    assert s["image_id"] not in {c.id for c in cands}


def test_coreset_keeps_away_from_what_is_labelled(tiny_params):
    p = tiny_params.model_copy(deep=True)
    p.active.batch_size = 1
    p.active.weights = {}
    p.active.diversity = "coreset"
    cands = [
        _cand(0, {"entropy": 0.5}, [0.0, 0.0]),
        _cand(1, {"entropy": 0.5}, [0.1, 0.0]),
        _cand(2, {"entropy": 0.5}, [5.0, 5.0]),
    ]
    near_zero = np.array([[0.05, 0.0]])
    assert select(p, cands, cold=False, seed=0, centres=near_zero)[0]["id"] == "d/img2"
    near_two = np.array([[5.0, 5.0]])
    assert select(p, cands, cold=False, seed=0, centres=near_two)[0]["id"] != "d/img2"


def test_records_of_dotted_names_do_not_collide(tiny_params):
    from srpu_pipelines.active_learning.scoring import record_paths

    a = record_paths(tiny_params, "a/S1_0.5kV")
    b = record_paths(tiny_params, "a/S1_0.7kV")
    assert a != b and a[0].name == "a__S1_0.5kV.json" and a[1].name == "a__S1_0.5kV.npy"


def test_stop_after_max_rounds_or_small_gains(tiny_params):
    from srpu_pipelines.active_learning.history import stop_reason

    p = tiny_params.model_copy(deep=True)
    p.active.max_rounds, p.active.stop_min_gain, p.active.stop_patience = 3, 0.01, 2
    first = {"corrected": [], "val_miou_before": None, "val_miou_after": 0.5}

    def rnd(before: float, after: float) -> dict:
        return {"corrected": ["x"], "val_miou_before": before, "val_miou_after": after}

    assert stop_reason(p, [first]) is None
    assert stop_reason(p, [first, rnd(0.5, 0.6), rnd(0.6, 0.605)]) is None  # one small gain
    why = stop_reason(p, [first, rnd(0.5, 0.6), rnd(0.6, 0.605), rnd(0.605, 0.605)])
    assert why and "active.max_rounds" in why  # three rounds with corrections
    p.active.max_rounds = 10
    why = stop_reason(p, [first, rnd(0.5, 0.6), rnd(0.6, 0.605), rnd(0.605, 0.605)])
    assert why and "stop_min_gain" in why and "[0.005, 0.0]" in why


def test_a_round_of_an_index_encoded_set_hands_over_index_masks_that_re_index(tmp_path):
    """nasa-ebc's masks are index PNGs: the mask a round hands over must be one too, or the
    corrected file is refused when it comes back."""
    from srpu_pipelines.data.demo import generate_demo
    from srpu_pipelines.data.index import load_index

    colour = parse_params(tiny_params_dict(tmp_path, **{"demo.pool_per_dataset": 3}))
    generate_demo(colour)
    p = parse_params(
        tiny_params_dict(tmp_path, **{"demo.pool_per_dataset": 3, "mask.encoding": "index"})
    )
    src, dst = MaskCodec.from_params(colour), MaskCodec.from_params(p)
    for m in sorted((tmp_path / "demo/labeled").rglob(f"*{p.mask.suffix}.png")):
        dst.save_png(m, src.decode_file(m))  # the demo set, re-encoded as index masks
    run_index(p, progress=False)
    _random_champion(p)
    run_score(p, None, progress=False)
    first = run_select(p, None)["summary"]["selected"][0]
    mask = Path(first["mask_file"])
    assert mask.is_file() and dst.decode_file(mask).shape == (64, 64)
    labeled = Path(next(d.labeled for d in p.data.datasets if d.name == first["dataset"]))
    shutil.copy(first["image_file"], labeled / Path(first["image_file"]).name)
    shutil.copy(mask, labeled / mask.name)
    run_index(p, progress=False)
    index = load_index(p.data.index_path)
    assert first["id"] in {it["id"] for it in index["items"] if it["split"] == "train"}


def test_a_cold_start_embeds_tiles_with_the_mae_encoder_where_there_is_one(al_params):
    """active.cold_features auto: appearance features (40 numbers) with no MAE encoder,
    the encoder's deepest features once `srpu pretrain` wrote one; a new encoder makes
    the stored records stale; `mae` without the file is an error naming the key."""
    from srpu_pipelines.active_learning.scoring import load_embeddings
    from srpu_pipelines.data.index import load_index

    p = al_params
    first = run_score(p, None, progress=False)
    some = load_index(p.data.index_path)["pool"][0]["id"]
    assert first["model_key"] == COLD_KEY and load_embeddings(p, some).shape[1] == 40
    enc = Path(p.pretrain.out_dir) / "encoder.pt"
    with pytest.raises(FileNotFoundError, match=r"active\.cold_features: mae, but .*encoder\.pt"):
        run_score(
            p.model_copy(update={"active": p.active.model_copy(update={"cold_features": "mae"})}),
            None,
            progress=False,
        )
    torch.manual_seed(1)
    model = model_from_params(p.model, p.num_classes)
    save_checkpoint(enc, model.encoder, {**model_config(p), "kind": "encoder"})
    second = run_score(p, None, progress=False)
    deepest = model.encoder.out_channels[-1]
    assert second["computed"] == first["computed"] and second["kept"] == 0
    assert load_embeddings(p, some).shape[1] == deepest
    assert run_score(p, None, progress=False)["kept"] == first["computed"]
    r = run_select(p, None)  # the cold start picks on those embeddings
    assert r["new"] and len(r["summary"]["selected"]) == p.active.batch_size


def test_history_tolerates_only_a_torn_last_line_and_numbers_rounds_uniquely(tiny_params):
    from srpu_pipelines.active_learning.history import (
        append_history,
        history_path,
        next_round,
        read_history,
    )
    from srpu_pipelines.errors import InputError

    p = tiny_params
    for n in (1, 2):
        append_history(p, {"round": n, "corrected": []})
    path = history_path(p)
    whole = path.read_bytes()
    with open(path, "ab") as fh:  # a crash while appending round 3
        fh.write(b'{"round": 3, "corr')
    assert [h["round"] for h in read_history(p)] == [1, 2]
    assert next_round(read_history(p)) == 3  # the torn round is redone under its number
    append_history(p, {"round": 3, "corrected": ["x"]})
    assert path.read_bytes().startswith(whole)  # the earlier lines untouched
    assert [h["round"] for h in read_history(p)] == [1, 2, 3]
    assert path.with_name(path.name + ".torn").read_text() == '{"round": 3, "corr\n'
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{damaged", *lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"history\.jsonl: line 2 is damaged"):
        read_history(p)
    path.write_text("\n".join([lines[0], lines[0], *lines[1:]]) + "\n")
    with pytest.raises(InputError, match=r"line 2 repeats round 1"):
        read_history(p)
    assert next_round([{"round": 1}, {"round": 5}]) == 6  # not the line count
