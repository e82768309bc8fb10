"""Selection: the cheap half of active learning, over stored scores.

Candidates are pool images (or their tiles) with a fresh score record, minus everything
already labelled or already awaiting correction. The registered strategy named by
``active.strategy`` (``active_learning/strategies.py``: random, each uncertainty score,
weighted, core-set, k-means, TypiClust, ProbCover, rare, the cold start, auto) chooses among
them; scores are rank-normalised over the candidates (0 = most certain, 1 = most
uncertain), embeddings are the encoder's features (appearance features in a cold start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from srpu_pipelines.active_learning.scoring import (
    COLD_KEY,
    cold_tag,
    is_fresh,
    load_embeddings,
    load_record,
    settings_key,
)
from srpu_pipelines.active_learning.strategies import (  # noqa: F401 (re-exported)
    LabelState,
    Pool,
    combined_scores,
    get_strategy,
    k_center_greedy,
    kmeans_pick,
    rank_normalise,
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
    class_probs: list[float] | None = None  # expected class shares (mean probabilities)
    pixels: int = 0  # the unit's area in px


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def candidates(
    params: Params, index: dict[str, Any], model_key: str, excluded: set[str]
) -> tuple[list[Candidate], list[str], np.ndarray]:
    """Selectable units with fresh scores; the images that have none (not yet scored by
    this model, or stale; labelled ones too where selection uses them); and the
    embeddings of what is labelled or awaiting correction (``excluded``), where scored:
    the centres the distance-based strategies keep away from.

    Never offered: a labelled or awaiting item; a whole image one of whose tiles is
    labelled or awaiting; a tile of a labelled or awaiting image, or one that overlaps a
    labelled or awaiting tile (the same pixels must not be labelled twice, perhaps into
    two splits)."""
    a = params.active
    settings = settings_key(params, cold_tag(params) if model_key == COLD_KEY else "")
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
        elif a.scores_labeled:  # scored without it: selection would not see them
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
                    rec.get("class_probs"),
                    int(sample_pixels(rec)),
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
                    t.get("class_probs"),
                    int(t["h"]) * int(t["w"]),
                )
            )
    dim = out[0].embedding.shape[0] if out else 0
    keep = [c for c in centres if c.shape[0] == dim]
    return out, unscored, np.stack(keep) if keep else np.zeros((0, dim))


def _unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Centred on ``mean`` and scaled to unit length: distances compare directions."""
    x = x - mean
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def sample_pixels(d: dict[str, Any]) -> float:
    """The area in px of an image's sample (above the data bar), from an index item or a
    score record (both carry height, width and data_bar_rows)."""
    rows = float(d.get("height") or 0) - float(d.get("data_bar_rows") or 0)
    return max(rows, 0.0) * float(d.get("width") or 0)


def label_state(index: dict[str, Any], num_classes: int) -> LabelState:
    """How many items train the model (labelled, in the train split), which classes none
    of their masks shows, and how many labelled pixels each class has."""
    seen = np.zeros(num_classes, bool)
    pixels = np.zeros(num_classes)
    train = [it for it in index["items"] if it.get("split") == "train"]
    for it in train:
        fr = np.asarray((it.get("class_fractions") or [])[:num_classes], float)
        seen[: len(fr)] |= fr > 0
        pixels[: len(fr)] += fr * sample_pixels(it)
    return LabelState(
        len(train),
        tuple(int(c) for c in np.flatnonzero(~seen)),
        tuple(round(float(v), 1) for v in pixels),
    )


def selection_space(raw: np.ndarray, centres: np.ndarray | None, cold: bool):
    """Embeddings in the space strategies measure distances in: the encoder's features
    centred on the candidates' mean and scaled to unit length (distances compare
    directions); appearance features (cold start, several scales) standardised per
    dimension. Returns (candidates, centres)."""
    raw = raw.astype(np.float64)
    cen = centres.astype(np.float64) if centres is not None and len(centres) else None
    if cold:
        mu, sd = raw.mean(0), np.maximum(raw.std(0), 1e-9)
        z = (raw - mu) / sd
        return z, ((cen - mu) / sd if cen is not None else np.zeros((0, raw.shape[1])))
    mean = raw.mean(0, keepdims=True)
    return _unit(raw, mean), (_unit(cen, mean) if cen is not None else np.zeros((0, raw.shape[1])))


def select(
    params: Params,
    cands: list[Candidate],
    cold: bool,
    seed: int,
    centres: np.ndarray | None = None,
    state: LabelState | None = None,
    strategy: str | None = None,
) -> list[dict[str, Any]]:
    """Pick ``active.batch_size`` candidates with the registered strategy
    ``active.strategy`` (or ``strategy``); returns them in rank order as dicts with the
    combined score and the score per strategy. ``centres`` (M, D): embeddings of what is
    labelled or awaiting correction; ``state``: what is labelled (for ``auto`` and
    ``rare``)."""
    a = params.active
    k = min(a.batch_size, len(cands))
    if k == 0:
        return []
    order = sorted(range(len(cands)), key=lambda i: cands[i].id)  # a fixed order to start
    cands = [cands[i] for i in order]
    emb, cen = selection_space(np.stack([c.embedding for c in cands]), centres, cold)
    names = sorted(cands[0].scores) if not cold else []
    scores = {s: np.array([c.scores[s] for c in cands], float) for s in names}
    probs = [c.class_probs for c in cands]
    known = all(q is not None for q in probs) and len({len(q) for q in probs}) == 1
    class_probs = np.array(probs, float) if not cold and known else None
    pool = Pool(
        ids=[c.id for c in cands],
        scores=scores,
        emb=emb,
        centres=cen,
        k=k,
        seed=seed,
        state=state or LabelState(),
        active=a,
        class_probs=class_probs,
        pixels=np.array([c.pixels for c in cands], float),
    )
    name = strategy or a.strategy
    choice = get_strategy(name)(pool)
    out = []
    for rank, i in enumerate(choice.rows, start=1):
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
                "combined_score": round(float(choice.combined[i]), 6),
                "scores": {s: round(float(v), 6) for s, v in sorted(c.scores.items())},
                "strategy": name,
                "method": choice.how,
            }
        )
    return out


def is_cold(params: Params, model_key: str) -> bool:
    mode = params.active.cold_start
    return mode == "always" or (mode == "auto" and model_key == COLD_KEY)
