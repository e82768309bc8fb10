"""Active-learning simulation benchmark (``srpu bench al``): prints JSON learning curves.

The labelled training images are cut into ``active.tile_size`` tiles (at most
``max_tiles``, a fixed sample); an oracle holds their masks back and reveals one only when
a strategy selects that tile. The protocol (issue 13): every arm, a registered selection
strategy, starts from zero labels and picks its own first tiles (random at random; the
others by their strategy on the cold-start features, so the cold start competes), trains
from scratch, then runs rounds: score the unlabelled tiles with the current model, select
``per_round`` tiles, reveal their masks, retrain warm from the previous model under a
fixed step (and optional time) budget, and score the test split. A full-label reference
trains on every tile for the same total number of steps. Per strategy: the curve (test
mIoU against labelled tiles), its normalised area (AUC), and the labelled tiles needed to
reach 95 % of the full-label mIoU, interpolated between rounds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from srpu_pipelines.active_learning import AL_ARMS
from srpu_pipelines.active_learning.scoring import COLD_KEY, score_pool
from srpu_pipelines.active_learning.selection import candidates, label_state, select
from srpu_pipelines.active_learning.uncertainty import tile_grid
from srpu_pipelines.analysis.evaluate import evaluate_checkpoint
from srpu_pipelines.bench.common import drop_weights, run_setup, spread, subset_index
from srpu_pipelines.config import UNCERTAINTY_STRATEGIES, Params
from srpu_pipelines.data.discovery import tile_name
from srpu_pipelines.data.fingerprint import item_stats
from srpu_pipelines.data.imageio import read_raw, to_grey
from srpu_pipelines.data.index import build_index, select_items
from srpu_pipelines.data.masks import MaskCodec, class_fractions, item_mask
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.files import atomic_write_json, atomic_write_with, read_json, sha256_file
from srpu_pipelines.training.trainer import train_stage


def cut_tiles(params: Params, index: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """Index items for every tile of every train image: the image tile at its stored bit
    depth and the mask tile in the set's mask encoding (the oracle's answers)."""
    import tifffile

    codec = MaskCodec.from_params(params)
    items = []
    for it in select_items(index, ["train"]):
        raw = read_raw(it["image"])
        mask = item_mask(it, codec)
        bar = int(it.get("data_bar_rows") or 0)  # tiles of the sample only
        for y, x, h, w in tile_grid(it["height"] - bar, it["width"], params.active.tile_size):
            name = tile_name(it["name"], y, x)
            img_path, mask_path = out / f"{name}.tif", out / f"{name}_mask.png"
            m = np.ascontiguousarray(mask[y : y + h, x : x + w])
            crop = np.ascontiguousarray(raw[y : y + h, x : x + w])
            if not img_path.is_file():
                atomic_write_with(img_path, lambda t, c=crop: tifffile.imwrite(t, c))
                codec.save_png(mask_path, m)  # in the set's own encoding
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
                    # what the plan reads, as `srpu index` stores it for an image
                    "stats": item_stats(crop, to_grey(crop), m, codec.num_classes),
                    "pixel_size_nm": it.get("pixel_size_nm"),
                    "data_bar_rows": 0,
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
    """The active-learning settings of one arm: the registered strategy ``arm``."""
    p = params.model_copy(deep=True)
    p.evaluate.overlays = 0
    # crops and inference windows no larger than a tile: no padding work (a planned
    # tile size is planned from the tiles, which bounds it the same way)
    if isinstance(p.train.tile_size, int):
        p.train.tile_size = min(p.train.tile_size, p.active.tile_size)
    p.inference.tile_size = min(p.inference.tile_size, p.active.tile_size)
    a = p.active
    a.unit = "image"  # each tile is its own image file here
    a.out_dir = out_dir
    if arm in UNCERTAINTY_STRATEGIES and arm not in a.strategies:
        a.strategies = [*a.strategies, arm]
    a.strategy = arm
    return p


def _auc(xs: list[int], ys: list[float]) -> float:
    """Area under the curve over the labelled range, divided by that range (a mean mIoU)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    return float(((y[1:] + y[:-1]) / 2 * np.diff(x)).sum() / (x[-1] - x[0]))


def labels_to_reach(xs: list[int], ys: list[float], target: float) -> float | None:
    """Labelled tiles at which the curve first reaches ``target``, linear between rounds
    (the first point when it starts above; None when it never does)."""
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        if y >= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return round(x0 + (target - y0) * (x - x0) / (y - y0), 3)
    return None


def cap_tiles(tiles: list[dict[str, Any]], max_tiles: int | None) -> list[dict[str, Any]]:
    """At most ``max_tiles`` tiles: a fixed random sample (the same for every seed and
    arm), kept in the cut order."""
    if max_tiles is None or len(tiles) <= max_tiles:
        return tiles
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(len(tiles), max_tiles, replace=False))
    return [tiles[i] for i in keep]


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
    max_tiles: int | None = 256,
    seed_list: list[int] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Every arm starts from zero labels and picks its own first ``initial`` tiles (random
    at random, the others by their strategy on the cold-start features), trains from
    scratch, then labels ``per_round`` tiles per round for ``rounds`` rounds, retraining
    warm for ``steps`` steps (and at most ``budget_s`` s) each. Resumes per seed, arm and
    round. ``seed_list`` runs only those seeds (to split a long run into commands)."""
    counts = {"seeds": seeds, "rounds": rounds, "per-round": per_round, "initial": initial}
    for name, value in {**counts, "steps": steps}.items():
        if value < 1:
            raise InputError(f"bench al: --{name} must be >= 1, got {value}")
    unknown = [a for a in arms if a not in AL_ARMS]
    if unknown:
        raise InputError(f"bench al: unknown arms {unknown}; valid: {', '.join(AL_ARMS)}")
    base = build_index(params, show_progress=False)
    tiles = cap_tiles(cut_tiles(params, base, work_dir / "tiles"), max_tiles)
    n_tiles = len(tiles)
    if initial + rounds * per_round > n_tiles:
        raise InputError(
            f"bench al: {initial} + {rounds} x {per_round} tiles asked, {n_tiles} available"
        )
    test_split = params.evaluate.split
    n_classes = len(params.classes)
    by_id = {t["id"]: t for t in tiles}

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
        return res, m

    settings = {
        "params": params.resolved(),
        "rounds": rounds,
        "per_round": per_round,
        "initial": initial,
        "steps": steps,
        "budget_s": budget_s,
        "tiles": sorted(by_id),
        "protocol": 2,  # 2: every arm picks its own start from zero labels
    }

    def cached(path: Path, seed: int) -> dict[str, Any] | None:
        """A finished piece of an earlier, interrupted run with the same settings."""
        if not path.is_file():
            return None
        done = read_json(path)
        return done if done.get("settings") == {**settings, "seed": seed} else None

    def keep(path: Path, seed: int, value: dict[str, Any]) -> None:
        atomic_write_json(path, {**value, "settings": {**settings, "seed": seed}})

    def pick(p: Params, arm: str, labeled: set[str], ckpt: Path | None, seed: int, r: int, k: int):
        idx = _round_index(base, tiles, labeled)
        if arm == "random":
            pool_ids = sorted(t["id"] for t in idx["pool"])
            return [str(i) for i in np.random.default_rng([seed, r]).choice(pool_ids, k, False)]
        # the model in the key: a round retrained after an interruption (time budget)
        # may differ, and its old scores must not count
        key = f"{arm}-r{r}-{sha256_file(ckpt)[:12]}" if ckpt is not None else COLD_KEY
        p.active.batch_size = k
        score_pool(p, idx, ckpt, key, progress=False)
        cands, _, centres = candidates(p, idx, key, set())
        state = label_state(idx, n_classes)
        chosen = select(
            p, cands, cold=ckpt is None, seed=seed * 100 + r, centres=centres, state=state
        )
        return [s["id"] for s in chosen]

    def point(labeled: set[str], m: dict[str, Any], picks: list[str]) -> dict[str, Any]:
        seen = np.zeros(n_classes, bool)
        for i in labeled:
            seen |= np.asarray(by_id[i]["class_fractions"], float)[:n_classes] > 0
        return {
            "labeled": len(labeled),
            "miou": round(m["miou"], 4),
            "iou": m["iou"],
            "picked": sorted(picks),
            "classes_in_labels": int(seen.sum()),
        }

    runs: list[dict[str, Any]] = []
    full_ref: dict[int, float] = {}
    seed_ids = list(range(seeds)) if seed_list is None else list(seed_list)
    bar = tqdm(
        total=len(seed_ids) * (len(arms) * (rounds + 1) + 1), desc="bench al", disable=not progress
    )
    for seed in seed_ids:
        sd = work_dir / f"seed{seed}"
        for arm in arms:
            ad = sd / arm
            done = cached(ad / "curve.json", seed)
            if done is not None:
                runs.append({"seed": seed, "arm": arm, "curve": done["curve"]})
                bar.update(rounds + 1)
                continue
            p = arm_params(params, arm, ad / "active")
            p.seed = seed
            # resume after the last finished round (its weights are kept until the next)
            prog = cached(ad / "progress.json", seed)
            if prog is not None and Path(prog["checkpoint"]).is_file():
                curve, ckpt = prog["curve"], Path(prog["checkpoint"])
                labeled = set(prog["labeled"])
                bar.update(len(curve))
            else:
                curve, ckpt, labeled = [], None, set()
            while len(curve) < rounds + 1:
                r = len(curve)
                picks = pick(p, arm, labeled, ckpt, seed, r, initial if r == 0 else per_round)
                labeled |= set(picks)
                res, m = train_eval(p, labeled, ad / f"r{r}", ckpt, steps)
                if ckpt is not None:
                    drop_weights(ckpt.parent)  # the next round started from it
                ckpt = res.best_checkpoint
                drop_weights(ckpt.parent, keep=ckpt.name)
                curve.append(point(labeled, m, picks))
                keep(
                    ad / "progress.json",
                    seed,
                    {"curve": curve, "labeled": sorted(labeled), "checkpoint": str(ckpt)},
                )
                bar.update()
            runs.append({"seed": seed, "arm": arm, "curve": curve})
            keep(ad / "curve.json", seed, {"curve": curve})
            if ckpt is not None:
                drop_weights(ckpt.parent)
        # every tile labelled, as many steps as the whole simulated run trained
        done = cached(sd / "full" / "full.json", seed)
        if done is None:
            p0 = arm_params(params, "random", sd / "full" / "active")
            p0.seed = seed
            _, mf = train_eval(p0, set(by_id), sd / "full", None, steps * (rounds + 1))
            done = {"miou": mf["miou"], "iou": mf["iou"]}
            keep(sd / "full" / "full.json", seed, done)
            drop_weights(sd / "full")
        full_ref[seed] = round(done["miou"], 4)  # as the JSON keeps it: merges agree
        bar.update()
    bar.close()
    meta = {
        "default_strategy": params.active.strategy,
        "tiles": n_tiles,
        "tile_size": params.active.tile_size,
        "initial": initial,
        "per_round": per_round,
        "rounds": rounds,
        "steps_per_round": steps,
        "budget_s_per_round": budget_s,
    }
    return summarize(meta, list(arms), runs, full_ref)


# what must agree for seeds run in separate commands to be one result
MERGE_KEYS = (
    "bench",
    "protocol",
    "tiles",
    "tile_size",
    "initial",
    "per_round",
    "rounds",
    "steps_per_round",
    "budget_s_per_round",
)


def summarize(
    meta: dict[str, Any],
    arms: list[str],
    runs: list[dict[str, Any]],
    full_ref: dict[int, float],
) -> dict[str, Any]:
    """Per arm over the seeds in ``runs``: AUC, tiles to 95 % of the same seed's
    full-label mIoU, the mean curve and (against random) the paired AUC gain."""
    seed_ids = sorted(full_ref)
    table = {}
    for arm in arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        if [r["seed"] for r in rs] != seed_ids:
            raise InputError(
                f"bench al: arm {arm!r} has seeds {[r['seed'] for r in rs]}, expected {seed_ids}"
            )
        aucs = [
            _auc([c["labeled"] for c in r["curve"]], [c["miou"] for c in r["curve"]]) for r in rs
        ]
        need = [  # against the same seed's full-label model
            labels_to_reach(
                [c["labeled"] for c in r["curve"]],
                [c["miou"] for c in r["curve"]],
                0.95 * full_ref[r["seed"]],
            )
            for r in rs
        ]
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
            reached = [
                (a, b)
                for a, b in zip(
                    row["labels_to_95pct_full"], rnd["labels_to_95pct_full"], strict=True
                )
                if a is not None and b is not None
            ]
            row["labels_to_95pct_ratio_vs_random"] = (
                round(float(np.mean([a for a, _ in reached]) / np.mean([b for _, b in reached])), 3)
                if reached
                else None
            )
    return {
        "bench": "al",
        "protocol": "every arm picks its own start from zero labels",
        **meta,
        "seeds": seed_ids,
        "full_label_miou": spread([full_ref[s] for s in seed_ids]),
        "full_label_miou_per_seed": {str(s): round(full_ref[s], 4) for s in seed_ids},
        "arms": table,
        "runs": sorted(runs, key=lambda r: (r["seed"], arms.index(r["arm"]))),
    }


def merge_results(results: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One result from per-seed results of separate ``bench al --seed k`` commands
    (``(name, result)`` pairs, the name for errors): their settings and arms must agree
    and no seed may appear twice. A result from before ``full_label_miou_per_seed``
    existed must hold a single seed (its full-label mIoU is then that seed's)."""
    if not results:
        raise InputError("bench al-merge: no results given")
    first_name, first = results[0]
    runs: list[dict[str, Any]] = []
    full_ref: dict[int, float] = {}
    for name, res in results:
        if res.get("bench") != "al" or "runs" not in res:
            raise InputError(f"bench al-merge: {name} is not a `srpu bench al` result")
        for key in MERGE_KEYS:
            if res.get(key) != first.get(key):
                raise InputError(
                    f"bench al-merge: {name} has {key}={res.get(key)!r}, "
                    f"{first_name} has {first.get(key)!r}: not the same benchmark"
                )
        if list(res["arms"]) != list(first["arms"]):
            raise InputError(
                f"bench al-merge: {name} has arms {list(res['arms'])}, "
                f"{first_name} has {list(first['arms'])}"
            )
        per_seed = res.get("full_label_miou_per_seed")
        if per_seed is None:
            if len(res["seeds"]) != 1:
                raise InputError(
                    f"bench al-merge: {name} holds seeds {res['seeds']} but no "
                    "full_label_miou_per_seed; rerun it with this version"
                )
            per_seed = {str(res["seeds"][0]): res["full_label_miou"]["mean"]}
        for seed_key, miou in per_seed.items():
            seed = int(seed_key)
            if seed in full_ref:
                raise InputError(f"bench al-merge: seed {seed} appears twice ({name})")
            full_ref[seed] = float(miou)
        runs.extend(res["runs"])
    # the shipped strategy picks no arm's tiles (each arm is named): it may have changed
    # between the commands, and the last file's is the one the plot marks
    meta = {
        "default_strategy": results[-1][1].get("default_strategy"),
        **{k: first[k] for k in MERGE_KEYS if k not in ("bench", "protocol")},
    }
    merged = summarize(meta, list(first["arms"]), runs, full_ref)
    merged["merged_from"] = [name for name, _ in results]
    return merged


def plot_curves(result: dict[str, Any], path: Path) -> None:
    """Test mIoU against labelled tiles, mean over seeds with the seed range shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    others = iter(f"C{i}" for i in (0, 1, 2, 4, 5, 6, 8, 9) * 2)  # C3 (red) is the default's
    # the two that matter most stand out: random (the bar) and the shipped default
    style = {
        "random": dict(color="k", ls="--", lw=2),
        result.get("default_strategy", "default"): dict(color="C3", lw=2.5),
    }
    for arm, row in result["arms"].items():
        rs = [r for r in result["runs"] if r["arm"] == arm]
        ys = np.array([[c["miou"] for c in r["curve"]] for r in rs])
        xs = row["labeled"]
        kw = style.get(arm) or dict(color=next(others), lw=1, alpha=0.8)
        shipped = " (shipped)" if arm == result.get("default_strategy") else ""
        label = f"{arm}{shipped} (AUC {row['auc']['mean']:.3f})"
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
