"""Selection: the cheap half of active learning, over stored scores.

Candidates are pool images (or their tiles) with a fresh score record, minus everything
already labelled or already awaiting correction. Each strategy's score is rank-normalised
over the candidates (0 = most certain, 1 = most uncertain), so strategies on different
scales combine by the weights in ``active.weights``. Diversity then spreads the batch over
the encoder's embeddings: core-set (k-centre greedy) or k-means among the best
``candidate_factor x batch_size`` candidates. In cold start (no model yet) k-means on
appearance features picks the image nearest each cluster centre: typical and diverse.
With all weights zero and no diversity the batch is random (a baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.stats import rankdata

from srpu_pipelines.active_learning.scoring import (
    COLD_KEY,
    is_fresh,
    load_embeddings,
    load_record,
    settings_key,
)
from srpu_pipelines.config import Params
from srpu_pipelines.data.discovery import tile_name, tile_parent


@dataclass
class Candidate:
    """One selectable unit: a whole pool image, or one tile of it."""

    id: str
    image_id: str
    dataset: str
    name: str
    image: str
    box: tuple[int, int, int, int] | None  # (y, x, h, w) for a tile, None for the image
    scores: dict[str, float]
    embedding: np.ndarray = field(repr=False)


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def candidates(
    params: Params, index: dict[str, Any], model_key: str, excluded: set[str]
) -> tuple[list[Candidate], list[str], np.ndarray]:
    """Selectable units with fresh scores; the images that have none (not yet scored by
    this model, or stale; with core-set, labelled ones too); and the embeddings of what
    is labelled or awaiting correction (``excluded``), where scored: the centres core-set
    keeps away from.

    Never offered: a labelled or awaiting item; a whole image one of whose tiles is
    labelled or awaiting; a tile of a labelled or awaiting image, or one that overlaps a
    labelled or awaiting tile (the same pixels must not be labelled twice, perhaps into
    two splits)."""
    a = params.active
    settings = settings_key(params)
    items = {it["id"]: it for it in index["items"]}
    taken = set(items) | excluded
    boxes: dict[str, list[tuple[int, int, int, int]]] = {}
    for i in taken:
        tp = tile_parent(i)
        if tp is not None:
            h, w = (items[i]["height"], items[i]["width"]) if i in items else (a.tile_size,) * 2
            boxes.setdefault(tp[0], []).append((tp[1], tp[2], h, w))
    out: list[Candidate] = []
    unscored: list[str] = []
    centres: list[np.ndarray] = []
    for item in index["items"]:  # scored for their embeddings only
        rec = load_record(params, item["id"])
        if is_fresh(rec, item, model_key, settings):
            centres.append(load_embeddings(params, item["id"]).mean(0))
        elif a.diversity == "coreset":  # scored without core-set: it would not see them
            unscored.append(item["id"])
    for item in index.get("pool", []):
        rec = load_record(params, item["id"])
        if not is_fresh(rec, item, model_key, settings):
            if item["id"] not in taken:
                unscored.append(item["id"])
            continue
        emb = load_embeddings(params, item["id"])
        if item["id"] in taken:
            centres.append(emb.mean(0))
            continue
        if a.unit == "image":
            if item["id"] in boxes:
                continue
            sc = {s: v[a.aggregation] for s, v in rec["image_scores"].items()}
            out.append(
                Candidate(
                    item["id"],
                    item["id"],
                    item["dataset"],
                    item["name"],
                    item["image"],
                    None,
                    sc,
                    emb.mean(0),
                )
            )
            continue
        for row, t in zip(emb, rec["tiles"], strict=True):
            box = (t["y"], t["x"], t["h"], t["w"])
            tid = tile_name(item["id"], t["y"], t["x"])
            if tid in excluded:
                centres.append(row)
            if any(_overlaps(box, b) for b in boxes.get(item["id"], [])):
                continue
            sc = {s: v[a.aggregation] for s, v in t["scores"].items()}
            out.append(
                Candidate(
                    tid,
                    item["id"],
                    item["dataset"],
                    tile_name(item["name"], t["y"], t["x"]),
                    item["image"],
                    box,
                    sc,
                    row,
                )
            )
    dim = out[0].embedding.shape[0] if out else 0
    keep = [c for c in centres if c.shape[0] == dim]
    return out, unscored, np.stack(keep) if keep else np.zeros((0, dim))


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank; one value gives 0.5)."""
    if values.size <= 1:
        return np.full(values.shape, 0.5)
    return (rankdata(values) - 1.0) / (values.size - 1)


def combined_scores(cands: list[Candidate], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of the rank-normalised strategy scores; zeros when no weight is set."""
    total = sum(weights.values())
    out = np.zeros(len(cands))
    if total <= 0 or not cands:
        return out
    for s, w in weights.items():
        if w > 0:
            out += w * rank_normalise(np.array([c.scores[s] for c in cands]))
    return out / total


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred on ``mean`` and scaled to unit length: distances compare directions."""
    x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def k_center_greedy(
    emb: np.ndarray, k: int, first: int, centres: np.ndarray | None = None
) -> list[int]:
    """Core-set selection: repeatedly take the point farthest from every chosen point (and
    from ``centres``, e.g. already labelled items). Starts at ``first`` when there are no
    centres. emb (N, D); returns k row indices."""
    k = min(k, len(emb))
    if k == 0:
        return []
    if centres is not None and len(centres):
        d = np.min(((emb[:, None] - centres[None]) ** 2).sum(-1), axis=1)
        chosen: list[int] = []
    else:
        chosen = [first]
        d = ((emb - emb[first]) ** 2).sum(-1)
    while len(chosen) < k:
        d_masked = d.copy()
        d_masked[chosen] = -1.0
        nxt = int(np.argmax(d_masked))
        chosen.append(nxt)
        d = np.minimum(d, ((emb - emb[nxt]) ** 2).sum(-1))
    return chosen


def kmeans_pick(emb: np.ndarray, k: int, score: np.ndarray, seed: int, typical: bool) -> list[int]:
    """k-means with k clusters; from each cluster the best-scoring point, or (``typical``)
    the point nearest its centre. Clusters in order of size, largest first."""
    from sklearn.cluster import KMeans

    k = min(k, len(emb))
    if k == 0:
        return []
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(emb)
    picks = []
    sizes = np.bincount(km.labels_, minlength=k)
    for c in sorted(range(k), key=lambda c: (-sizes[c], c)):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:
            continue
        if typical:
            dist = ((emb[members] - km.cluster_centers_[c]) ** 2).sum(-1)
            picks.append(int(members[np.argmin(dist)]))
        else:
            picks.append(int(members[np.argmax(score[members])]))
    return picks


def select(
    params: Params,
    cands: list[Candidate],
    cold: bool,
    seed: int,
    centres: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Pick ``active.batch_size`` candidates; returns them in rank order as dicts with the
    combined score and the score per strategy. ``centres`` (M, D): embeddings of what is
    labelled or awaiting correction; core-set picks far from them."""
    a = params.active
    k = min(a.batch_size, len(cands))
    if k == 0:
        return []
    order = sorted(range(len(cands)), key=lambda i: cands[i].id)  # a fixed order to start
    cands = [cands[i] for i in order]
    raw_emb = np.stack([c.embedding for c in cands]).astype(np.float64)
    mean = raw_emb.mean(0, keepdims=True)
    emb = _unit(raw_emb, mean)
    cen = _unit(centres.astype(np.float64), mean) if centres is not None and len(centres) else None
    if cold:
        # appearance features on different scales: standardise each before clustering
        raw = np.stack([c.embedding for c in cands]).astype(np.float64)
        z = (raw - raw.mean(0)) / np.maximum(raw.std(0), 1e-9)
        picks = kmeans_pick(z, k, np.zeros(len(cands)), seed, typical=True)
        combined = np.zeros(len(cands))
        how = "cold start: k-means on appearance, nearest to each centre"
    else:
        combined = combined_scores(cands, a.weights)
        weighted = sum(a.weights.values()) > 0
        if a.diversity == "none":
            if weighted:
                picks = sorted(range(len(cands)), key=lambda i: (-combined[i], cands[i].id))[:k]
                how = "top combined score"
            else:
                picks = list(np.random.default_rng(seed).permutation(len(cands))[:k])
                how = "random (all weights are zero, no diversity)"
        else:
            pool = len(cands)
            if weighted:
                pool = min(len(cands), max(k, int(math.ceil(a.candidate_factor * k))))
            top = sorted(range(len(cands)), key=lambda i: (-combined[i], cands[i].id))[:pool]
            sub = emb[top]
            if a.diversity == "coreset":
                # far from what is labelled; with nothing labelled, start from the most
                # uncertain (weighted) or the most typical (unweighted)
                first = 0 if weighted else int(np.argmin(((sub - sub.mean(0)) ** 2).sum(-1)))
                local = k_center_greedy(sub, k, first, cen)
            else:
                local = kmeans_pick(sub, k, combined[top], seed, typical=not weighted)
            picks = [top[i] for i in local]
            how = f"{a.diversity} among the top {pool} by combined score"
    out = []
    for rank, i in enumerate(picks, start=1):
        c = cands[i]
        out.append(
            {
                "rank": rank,
                "id": c.id,
                "image_id": c.image_id,
                "dataset": c.dataset,
                "name": c.name,
                "image": c.image,
                "box": list(c.box) if c.box else None,
                "combined_score": round(float(combined[i]), 6),
                "scores": {s: round(float(v), 6) for s, v in sorted(c.scores.items())},
                "method": how,
            }
        )
    return out


def is_cold(params: Params, model_key: str) -> bool:
    mode = params.active.cold_start
    return mode == "always" or (mode == "auto" and model_key == COLD_KEY)
