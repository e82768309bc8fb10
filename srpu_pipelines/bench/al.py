"""Active-learning simulation benchmark (``srpu bench al``): prints JSON learning curves.

The labelled training images are cut into ``active.tile_size`` tiles; an oracle holds
their masks back and reveals one only when a strategy selects that tile. Each seed
starts from the same few random tiles, trains a model, and then, per strategy, runs
rounds: score the unlabelled tiles with the current model, select ``per_round`` tiles,
reveal their masks, retrain warm from the previous model under a fixed step (and
optional time) budget, and score the test split. A full-label reference trains on every
tile for the same total number of steps. Per strategy: the curve (test mIoU against
labelled tiles), its normalised area, and the labels needed to reach 95 % of the
full-label mIoU.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from srpu_pipelines.active_learning import AL_ARMS
from srpu_pipelines.active_learning.scoring import score_pool
from srpu_pipelines.active_learning.selection import candidates, select
from srpu_pipelines.active_learning.uncertainty import tile_grid
from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.bench.common import drop_weights, run_setup, spread, subset_index
from srpu_pipelines.config import Params
from srpu_pipelines.data.discovery import tile_name
from srpu_pipelines.data.imageio import read_raw
from srpu_pipelines.data.index import build_index, select_items
from srpu_pipelines.data.masks import MaskCodec, class_fractions, item_mask
from srpu_pipelines.io.files import atomic_write_json, atomic_write_with, read_json, sha256_file
from srpu_pipelines.training.trainer import train_stage


def cut_tiles(params: Params, index: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Index items for every tile of every train image: the image tile at its stored bit
    depth and the mask tile in the class colours (the oracle's answers)."""
    import tifffile

    codec = MaskCodec.from_params(params)
    items = []
    for it in select_items(index, ["train"]):
        raw = read_raw(it["image"])
        mask = item_mask(it, codec)
        for y, x, h, w in tile_grid(it["height"], it["width"], params.active.tile_size):
            name = tile_name(it["name"], y, x)
            img_path, mask_path = out / f"{name}.tif", out / f"{name}_mask.png"
            m = np.ascontiguousarray(mask[y : y + h, x : x + w])
            if not img_path.is_file():
                crop = np.ascontiguousarray(raw[y : y + h, x : x + w])
                atomic_write_with(img_path, lambda t, c=crop: tifffile.imwrite(t, c))
                rgb = codec.to_color(m)
                atomic_write_with(
                    mask_path, lambda t, c=rgb: Image.fromarray(c).save(t, format="PNG")
                )
            items.append(
                {
                    "id": tile_name(it["id"], y, x),
                    "name": name,
                    "dataset": it["dataset"],
                    "image": str(img_path),
                    "mask": str(mask_path),
                    "image_sha256": sha256_file(img_path),
                    "mask_sha256": sha256_file(mask_path),
                    "height": h,
                    "width": w,
                    "class_fractions": class_fractions(m, codec.num_classes),
                    "split": "train",
                }
            )
    return items


def _round_index(
    base: dict[str, Any], tiles: list[dict[str, Any]], labeled: set[str]
) -> dict[str, Any]:
    """Val and test images as they are; labelled tiles as train items, the rest as pool."""
    keep = [it for it in base["items"] if it["split"] != "train"]
    return subset_index({**base, "items": keep + tiles, "pool": []}, labeled)


def arm_params(params: Params, arm: str, out_dir: Path) -> Params:
    """The active-learning settings of one arm."""
    p = params.model_copy(deep=True)
    p.evaluate.overlays = 0
    # crops and inference windows no larger than a tile: no padding work
    p.train.tile_size = min(p.train.tile_size, p.active.tile_size)
    p.inference.tile_size = min(p.inference.tile_size, p.active.tile_size)
    a = p.active
    a.unit = "image"  # each tile is its own image file here
    a.out_dir = out_dir
    if arm in ("random", "coreset"):
        a.weights = {}
        a.diversity = "none" if arm == "random" else "coreset"
    elif arm != "default":
        if arm not in a.strategies:
            a.strategies = [*a.strategies, arm]
        a.weights = {arm: 1.0}
        a.diversity = "none"
    return p


def _auc(xs: list[int], ys: list[float]) -> float:
    """Area under the curve over the labelled range, divided by that range (a mean mIoU)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def bench_al(
    params: Params,
    seeds: int,
    rounds: int,
    per_round: int,
    initial: int,
    steps: int,
    budget_s: float | None,
    work_dir: Path,
    arms: tuple[str, ...] = AL_ARMS,
    progress: bool = True,
) -> dict[str, Any]:
    counts = {"seeds": seeds, "rounds": rounds, "per-round": per_round, "initial": initial}
    for name, value in {**counts, "steps": steps}.items():
        if value < 1:
            raise ValueError(f"bench al: --{name} must be >= 1, got {value}")
    base = build_index(params, show_progress=False)
    tiles = cut_tiles(params, base, work_dir / "tiles")
    n_tiles = len(tiles)
    if initial + rounds * per_round > n_tiles:
        raise ValueError(
            f"bench al: {initial} + {rounds} x {per_round} tiles asked, {n_tiles} available"
        )
    test_split = params.evaluate.split

    def train_eval(p: Params, labeled: set[str], out: Path, init: Path | None, n_steps: int):
        if out.exists():
            shutil.rmtree(out)
        idx = _round_index(base, tiles, labeled)
        res = train_stage(
            run_setup(p, out, budget_s * n_steps / steps if budget_s else None, n_steps),
            idx,
            init_weights=init,
            init_require="model" if init else None,
            progress=False,
        )
        m = evaluate_checkpoint(
            p, idx, res.best_checkpoint, split=test_split, out_dir=out / "eval", progress=False
        )
        return res, idx, m

    settings = {
        "params": params.resolved(),
        "rounds": rounds,
        "per_round": per_round,
        "initial": initial,
        "steps": steps,
        "budget_s": budget_s,
    }

    def cached(path: Path, seed: int) -> dict[str, Any] | None:
        """A finished piece of an earlier, interrupted run with the same settings."""
        if not path.is_file():
            return None
        done = read_json(path)
        return done if done.get("settings") == {**settings, "seed": seed} else None

    def keep(path: Path, seed: int, value: dict[str, Any]) -> None:
        atomic_write_json(path, {**value, "settings": {**settings, "seed": seed}})

    runs: list[dict[str, Any]] = []
    full_ref: list[float] = []
    bar = tqdm(total=seeds * (1 + len(arms) * rounds + 1), desc="bench al", disable=not progress)
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        start = {tiles[i]["id"] for i in rng.choice(n_tiles, initial, replace=False)}
        sd = work_dir / f"seed{seed}"
        p0 = arm_params(params, "default", sd / "r0" / "active")
        p0.seed = seed
        ckpt0 = sd / "r0" / "best.pt"
        m0 = cached(sd / "r0" / "r0.json", seed)
        if m0 is None or not ckpt0.is_file():
            res0, _, m0 = train_eval(p0, start, sd / "r0", None, steps)
            ckpt0 = res0.best_checkpoint
            drop_weights(ckpt0.parent, keep=ckpt0.name)  # every arm starts from it
            keep(sd / "r0" / "r0.json", seed, {"miou": m0["miou"], "iou": m0["iou"]})
        bar.update()
        for arm in arms:
            done = cached(sd / arm / "curve.json", seed)
            if done is not None:
                runs.append({"seed": seed, "arm": arm, "curve": done["curve"]})
                bar.update(rounds)
                continue
            p = arm_params(params, arm, sd / arm / "active")
            p.seed = seed
            labeled, ckpt = set(start), ckpt0
            curve = [{"labeled": len(labeled), "miou": round(m0["miou"], 4), "iou": m0["iou"]}]
            for r in range(1, rounds + 1):
                idx = _round_index(base, tiles, labeled)
                if arm == "random":
                    pool_ids = sorted(t["id"] for t in idx["pool"])
                    picks = list(
                        np.random.default_rng([seed, r]).choice(pool_ids, per_round, replace=False)
                    )
                else:
                    # the model in the key: a round retrained after an interruption
                    # (time budget) may differ, and its old scores must not count
                    key = f"{arm}-r{r}-{sha256_file(ckpt)[:12]}"
                    p.active.batch_size = per_round
                    score_pool(p, idx, ckpt, key, progress=False)
                    cands, _, centres = candidates(p, idx, key, set())
                    chosen = select(p, cands, cold=False, seed=seed * 100 + r, centres=centres)
                    picks = [s["id"] for s in chosen]
                labeled |= set(picks)
                res, _, m = train_eval(p, labeled, sd / arm / f"r{r}", ckpt, steps)
                if ckpt != ckpt0:
                    drop_weights(ckpt.parent)  # the next round starts from this one
                ckpt = res.best_checkpoint
                drop_weights(ckpt.parent, keep=ckpt.name)
                curve.append(
                    {
                        "labeled": len(labeled),
                        "miou": round(m["miou"], 4),
                        "iou": m["iou"],
                        "picked": sorted(str(i) for i in picks),
                    }
                )
                bar.update()
            runs.append({"seed": seed, "arm": arm, "curve": curve})
            keep(sd / arm / "curve.json", seed, {"curve": curve})
            if ckpt != ckpt0:
                drop_weights(ckpt.parent)
        # every tile labelled, as many steps as the whole simulated run trained
        done = cached(sd / "full" / "full.json", seed)
        if done is None:
            _, _, mf = train_eval(
                p0, {t["id"] for t in tiles}, sd / "full", None, steps * (rounds + 1)
            )
            done = {"miou": mf["miou"]}
            keep(sd / "full" / "full.json", seed, done)
            drop_weights(sd / "full")
        full_ref.append(done["miou"])
        bar.update()
    bar.close()
    table = {}
    for arm in arms:
        rs = [r for r in runs if r["arm"] == arm]
        aucs = [
            _auc([c["labeled"] for c in r["curve"]], [c["miou"] for c in r["curve"]]) for r in rs
        ]
        need = []  # against the same seed's full-label model
        for r in rs:
            target = 0.95 * full_ref[r["seed"]]
            hit = [c["labeled"] for c in r["curve"] if c["miou"] >= target]
            need.append(hit[0] if hit else None)
        xs = [c["labeled"] for c in rs[0]["curve"]]
        table[arm] = {
            "auc": spread(aucs),
            "aucs": [round(a, 4) for a in aucs],
            "labels_to_95pct_full": need,
            "curve_mean": [
                round(float(np.mean([r["curve"][i]["miou"] for r in rs])), 4)
                for i in range(len(xs))
            ],
            "labeled": xs,
        }
    rnd = table.get("random")
    for arm, row in table.items():
        if rnd and arm != "random":
            gains = [a - b for a, b in zip(row["aucs"], rnd["aucs"], strict=True)]
            row["paired_auc_gain_vs_random"] = [round(g, 4) for g in gains]
    return {
        "bench": "al",
        "tiles": n_tiles,
        "tile_size": params.active.tile_size,
        "initial": initial,
        "per_round": per_round,
        "rounds": rounds,
        "steps_per_round": steps,
        "budget_s_per_round": budget_s,
        "full_label_miou": spread(full_ref),
        "arms": table,
        "runs": runs,
    }


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Test mIoU against labelled tiles, mean over seeds with the seed range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    others = iter(f"C{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9) * 2)  # C3 (red) is the default's
    # the two that matter most stand out: random (the bar) and the shipped default
    style = {"random": dict(color="k", ls="--", lw=2), "default": dict(color="C3", lw=2.5)}
    for arm, row in result["arms"].items():
        rs = [r for r in result["runs"] if r["arm"] == arm]
        ys = np.array([[c["miou"] for c in r["curve"]] for r in rs])
        xs = row["labeled"]
        kw = style.get(arm) or dict(color=next(others), lw=1, alpha=0.8)
        label = f"{arm} (AUC {row['auc']['mean']:.3f})"
        ax.plot(xs, ys.mean(0), marker="o", ms=3, label=label, **kw)
        if arm in style:
            ax.fill_between(xs, ys.min(0), ys.max(0), color=kw["color"], alpha=0.12)
    target = 0.95 * result["full_label_miou"]["mean"]
    ax.axhline(target, color="grey", lw=0.8, ls=":")
    ax.annotate("95 % of full-label mIoU", (xs[-1], target), ha="right", va="bottom", fontsize=7)
    ax.set_xticks(xs)
    ax.set_xlabel(f"labelled tiles ({result['tile_size']} px)")
    ax.set_ylabel("test mIoU")
    n = len({r["seed"] for r in result["runs"]})
    ax.set_title(f"active learning: mean over {n} seeds (shaded: range, random and default)")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda t: fig.savefig(t, format="png"))
    plt.close(fig)
