"""Selection strategies as registered objects (MONAI Label's ``Strategy`` classes are the
model): ``select`` looks one up by ``active.strategy``, and ``srpu bench al`` takes its
arms from the same registry.

A strategy sees a :class:`Pool`: the candidates (with their rank-normalised uncertainty
scores, where a model made them), their embeddings in one space (the encoder's features
centred and scaled to unit length; appearance features standardised per dimension in a
cold start), the embeddings of what is labelled or awaiting correction, the batch size,
a seed and the label state (how many items are labelled, which classes none of them
shows, how many labelled pixels each class has); where a model scored them, each
candidate's expected class shares and area. It returns the chosen rows in rank order.

- ``random``: a seeded random batch (the baseline every other strategy must beat).
- one per uncertainty score (``entropy``, ``margin``, ...): the most uncertain by it.
- ``weighted``: ``active.weights`` combine the scores; ``active.diversity`` (core-set or
  k-means) spreads the batch among the best ``candidate_factor x batch_size``.
- ``coreset``: k-centre greedy over all candidates, far from what is labelled.
- ``kmeans``: k-means with ``batch_size`` clusters, the most typical point of each.
- ``typiclust`` (Hacohen et al. 2022): ``labelled + batch`` clusters; the next pick comes
  from the largest cluster that holds the fewest labelled points, its most typical point
  (typicality: inverse mean distance to its nearest neighbours).
- ``probcover`` (Yehuda et al. 2022): balls of radius delta (the largest whose balls stay
  pure to a k-means partition in ``active.probcover_purity`` of points); greedy maximum
  coverage of what labelled balls do not cover yet.
- ``rare``: picks that seek the phases the labels hold least of. Each class needs
  ``1 / max(its share of the labelled pixels, active.rare_floor)``; a candidate's gain is
  its expected class shares (mean predicted probabilities) weighted by those needs; the
  best gain is taken, its expected pixels are added to the labelled ones (so the needs
  move within the batch: a class that becomes scarce, background included, is sought
  next), and one pick per k-means cluster of the embeddings
  (``active.rare_clusters x batch_size`` clusters) keeps the batch diverse. Without a
  model (no predictions) or labelled pixels it is ``typiclust``.
- ``cold_start``: k-means on the features, the point nearest each centre.
- ``auto``: ``typiclust`` while fewer than ``active.auto_uncertainty_after`` items are
  labelled or some class is in no label yet, then ``weighted`` (uncertainty with
  diversity): typical picks while the model does not know every phase, its doubts after.

A strategy that needs uncertainty scores falls back to ``cold_start`` when there are none
(no model yet); ``random``, ``coreset``, ``kmeans``, ``typiclust`` and ``probcover`` need
only embeddings and run cold as they run warm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from scipy.stats import rankdata

from srpu_pipelines.config import SELECTION_STRATEGIES, UNCERTAINTY_STRATEGIES, ActiveParams
from srpu_pipelines.errors import InputError, UnknownNameError

MAX_DENSE = 4096  # candidates above this are subsampled (seeded) for the pairwise strategies


@dataclass
class LabelState:
    """What is labelled so far: the count, the classes no label shows yet and the
    labelled pixels per class."""

    labeled: int = 0
    classes_missing: tuple[int, ...] = ()
    class_pixels: tuple[float, ...] = ()  # labelled pixels per class


@dataclass
class Pool:
    """What a strategy chooses from."""

    ids: list[str]  # candidate ids, in the fixed order of the rows below
    scores: dict[str, np.ndarray]  # strategy -> (N,) raw uncertainty score; empty when cold
    emb: np.ndarray  # (N, D) in the selection space
    centres: np.ndarray  # (M, D) labelled or awaiting, same space; M may be 0
    k: int
    seed: int
    state: LabelState
    active: ActiveParams
    class_probs: np.ndarray | None = None  # (N, C) expected class shares, where predicted
    pixels: np.ndarray | None = None  # (N,) each candidate's area in px, where known

    @property
    def cold(self) -> bool:
        return not self.scores


@dataclass
class Choice:
    rows: list[int]
    combined: np.ndarray  # (N,) the score the picks were ranked by (zeros when none)
    how: str


def rank_normalise(values: np.ndarray) -> np.ndarray:
    """Ranks scaled to [0, 1] (ties share their mean rank; one value gives 0.5)."""
    if values.size <= 1:
        return np.full(values.shape, 0.5)
    return (rankdata(values) - 1.0) / (values.size - 1)


def combined_scores(scores: dict[str, np.ndarray], weights: dict[str, float], n: int) -> np.ndarray:
    """Weighted mean of the rank-normalised strategy scores; zeros when no weight is set."""
    total = sum(weights.values())
    out = np.zeros(n)
    if total <= 0 or n == 0:
        return out
    for s, w in weights.items():
        if w > 0:
            out += w * rank_normalise(scores[s])
    return out / total


def _sqdist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2.0 * a @ b.T
    return np.maximum(d, 0.0)


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
        d = _sqdist(emb, centres).min(1)
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


def _kmeans(emb: np.ndarray, k: int, seed: int):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit(emb)


def kmeans_pick(emb: np.ndarray, k: int, score: np.ndarray, seed: int, typical: bool) -> list[int]:
    """k-means with k clusters; from each cluster the best-scoring point, or (``typical``)
    the point nearest its centre. Clusters in order of size, largest first."""
    k = min(k, len(emb))
    if k == 0:
        return []
    km = _kmeans(emb, k, seed)
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


def typicality(emb: np.ndarray, neighbours: int) -> np.ndarray:
    """(N,) inverse mean Euclidean distance to the ``neighbours`` nearest other points:
    high in dense regions (TypiClust's typicality)."""
    n = len(emb)
    if n <= 1:
        return np.ones(n)
    kk = max(1, min(neighbours, n - 1))
    d = np.sqrt(_sqdist(emb, emb))
    np.fill_diagonal(d, np.inf)
    near = np.partition(d, kk - 1, axis=1)[:, :kk]
    return 1.0 / (near.mean(1) + 1e-12)


# -- the registry ---------------------------------------------------------------------------
class Strategy:
    """One way of choosing a batch. Subclasses set ``name`` and implement ``choose``."""

    name: ClassVar[str]
    uses_scores: ClassVar[bool] = False  # needs a model's uncertainty scores
    description: ClassVar[str] = ""

    def choose(self, pool: Pool) -> Choice:
        raise NotImplementedError

    def __call__(self, pool: Pool) -> Choice:
        if pool.k == 0:
            return Choice([], np.zeros(len(pool.ids)), "nothing to pick")
        if self.uses_scores and pool.cold:
            c = REGISTRY["cold_start"]().choose(pool)
            return Choice(c.rows, c.combined, f"{c.how} (no model yet for {self.name})")
        return self.choose(pool)


REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    if cls.name in REGISTRY:
        raise InputError(f"selection strategy {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get_strategy(name: str) -> Strategy:
    """The registered strategy ``name`` (an error lists the valid names)."""
    if name not in REGISTRY:
        raise UnknownNameError(f"unknown selection strategy {name!r}; valid: {', '.join(REGISTRY)}")
    return REGISTRY[name]()


@register
class RandomStrategy(Strategy):
    name = "random"
    description = "a seeded random batch"

    def choose(self, pool: Pool) -> Choice:
        rows = np.random.default_rng(pool.seed).permutation(len(pool.ids))[: pool.k]
        return Choice([int(i) for i in rows], np.zeros(len(pool.ids)), "random")


class ScoreStrategy(Strategy):
    """The most uncertain candidates by one score."""

    uses_scores = True
    score: ClassVar[str]

    def choose(self, pool: Pool) -> Choice:
        s = pool.scores[self.score]
        comb = rank_normalise(s)
        rows = sorted(range(len(s)), key=lambda i: (-comb[i], pool.ids[i]))[: pool.k]
        return Choice(rows, comb, f"top {self.score}")


for _s in UNCERTAINTY_STRATEGIES:
    register(
        type(
            f"Score_{_s}",
            (ScoreStrategy,),
            {"name": _s, "score": _s, "description": f"the most uncertain by {_s}"},
        )
    )


@register
class WeightedStrategy(Strategy):
    name = "weighted"
    uses_scores = True
    description = "active.weights combine the scores; active.diversity spreads the batch"

    def choose(self, pool: Pool) -> Choice:
        a, k, n = pool.active, pool.k, len(pool.ids)
        missing = sorted(set(a.weights) - set(pool.scores))
        if missing:
            raise InputError(f"active.weights names scores the pool records lack: {missing}")
        comb = combined_scores(pool.scores, a.weights, n)
        weighted = sum(a.weights.values()) > 0
        order = sorted(range(n), key=lambda i: (-comb[i], pool.ids[i]))
        if a.diversity == "none":
            if weighted:
                return Choice(order[:k], comb, "top combined score")
            return REGISTRY["random"]().choose(pool)
        size = min(n, max(k, int(math.ceil(a.candidate_factor * k)))) if weighted else n
        top = order[:size]
        sub = pool.emb[top]
        if a.diversity == "coreset":
            # far from what is labelled; with nothing labelled, start from the most
            # uncertain (weighted) or the most typical (unweighted)
            first = 0 if weighted else int(np.argmin(((sub - sub.mean(0)) ** 2).sum(-1)))
            local = k_center_greedy(sub, k, first, pool.centres)
        else:
            local = kmeans_pick(sub, k, comb[top], pool.seed, typical=not weighted)
        return Choice([top[i] for i in local], comb, f"{a.diversity} among the top {size}")


@register
class CoresetStrategy(Strategy):
    name = "coreset"
    description = "k-centre greedy over every candidate, far from what is labelled"

    def choose(self, pool: Pool) -> Choice:
        e = pool.emb
        first = int(np.argmin(((e - e.mean(0)) ** 2).sum(-1)))
        rows = k_center_greedy(e, pool.k, first, pool.centres)
        return Choice(rows, np.zeros(len(e)), "core-set (k-centre greedy)")


@register
class KMeansStrategy(Strategy):
    name = "kmeans"
    description = "k-means with batch_size clusters, the most typical point of each"

    def choose(self, pool: Pool) -> Choice:
        rows = kmeans_pick(pool.emb, pool.k, np.zeros(len(pool.ids)), pool.seed, typical=True)
        return Choice(rows, np.zeros(len(pool.ids)), "k-means, nearest to each centre")


@register
class ColdStartStrategy(KMeansStrategy):
    name = "cold_start"
    description = "k-means on the features (appearance without a model), typical points"

    def choose(self, pool: Pool) -> Choice:
        c = super().choose(pool)
        return Choice(c.rows, c.combined, "cold start: k-means, nearest to each centre")


def _subsample(pool: Pool) -> np.ndarray:
    """Rows the pairwise strategies work on: all of them up to MAX_DENSE, else a seeded
    sample (distances are N x N)."""
    n = len(pool.ids)
    if n <= MAX_DENSE:
        return np.arange(n)
    return np.sort(np.random.default_rng(pool.seed).choice(n, MAX_DENSE, replace=False))


@register
class TypiClustStrategy(Strategy):
    name = "typiclust"
    description = "typical points of the largest clusters not yet labelled (TypiClust)"

    def choose(self, pool: Pool) -> Choice:
        rows = _subsample(pool)
        e, c = pool.emb[rows], pool.centres
        n, m = len(e), len(c)
        allpts = np.concatenate([e, c]) if m else e
        n_clusters = min(len(allpts), m + pool.k, pool.active.typiclust_max_clusters)
        labels = _kmeans(allpts, n_clusters, pool.seed).labels_
        cand_lab, cent_lab = labels[:n], labels[n:]
        covered = np.bincount(cent_lab, minlength=n_clusters).astype(float)
        sizes = np.bincount(cand_lab, minlength=n_clusters)
        members = {cl: np.flatnonzero(cand_lab == cl) for cl in range(n_clusters)}
        typ = np.zeros(n)
        for idx in members.values():
            if idx.size:
                nb = max(1, min(pool.active.typical_neighbours, idx.size // 2))
                typ[idx] = typicality(e[idx], nb)
        left = {cl: set(idx.tolist()) for cl, idx in members.items() if idx.size}
        taken: list[int] = []
        for _ in range(min(pool.k, n)):
            # the cluster with the fewest labelled points, the largest among those
            open_ = [cl for cl, rest in left.items() if rest]
            if not open_:
                break
            cl = min(open_, key=lambda q: (covered[q], -sizes[q], q))
            best = max(left[cl], key=lambda i: (typ[i], -i))
            left[cl].discard(best)
            taken.append(int(best))
            covered[cl] += 1
        return Choice(
            [int(rows[i]) for i in taken],
            np.zeros(len(pool.ids)),
            f"TypiClust: {n_clusters} clusters, typical points of the least covered",
        )


def pairwise_distances(emb: np.ndarray) -> np.ndarray:
    """(N, N) Euclidean distances, the diagonal exactly 0 (the expansion's rounding
    leaves tiny values there)."""
    d = np.sqrt(_sqdist(emb, emb))
    np.fill_diagonal(d, 0.0)
    return d


def purity_radius(emb: np.ndarray, seed: int, purity: float, d: np.ndarray | None = None) -> float:
    """ProbCover's delta: the largest radius (over quantiles of the pairwise distances)
    at which at least ``purity`` of the points' balls hold one k-means cluster only. The
    paper's clusters are the classes; here their number is the one of 2..10 with the best
    silhouette (the pool's own grouping). ``d``: ``pairwise_distances(emb)`` where the
    caller has it already."""
    from sklearn.metrics import silhouette_score

    n = len(emb)
    if n < 4:
        return float("inf")
    d = pairwise_distances(emb) if d is None else d
    best_s, labels = -2.0, None
    for k in range(2, max(2, min(10, n // 5)) + 1):
        lab = _kmeans(emb, k, seed).labels_
        if len(set(lab)) < 2:
            continue
        sc = silhouette_score(d, lab, metric="precomputed")
        if sc > best_s:
            best_s, labels = sc, lab
    if labels is None:
        return float("inf")
    other = labels[:, None] != labels[None]
    # the distance to the nearest point of another cluster: a ball is pure below it
    nearest_other = np.where(other, d, np.inf).min(1)
    off = d[~np.eye(n, dtype=bool)]
    best = float(np.quantile(off, 0.001))
    for q in np.linspace(0.001, 0.5, 60):
        delta = float(np.quantile(off, q))
        if (nearest_other > delta).mean() >= purity:
            best = delta
        else:
            break
    return best


@register
class ProbCoverStrategy(Strategy):
    name = "probcover"
    description = "greedy maximum coverage of delta-balls (ProbCover)"

    def choose(self, pool: Pool) -> Choice:
        rows = _subsample(pool)
        e, c = pool.emb[rows], pool.centres
        d = pairwise_distances(e)  # N x N once: for delta and for the balls
        delta = purity_radius(e, pool.seed, pool.active.probcover_purity, d)
        adj = d <= delta  # i covers j
        uncovered = np.ones(len(e), bool)
        if len(c):
            uncovered &= ~(np.sqrt(_sqdist(c, e)) <= delta).any(0)
        taken: list[int] = []
        rng = np.random.default_rng(pool.seed)
        for _ in range(min(pool.k, len(e))):
            gain = (adj & uncovered[None]).sum(1).astype(float)
            gain[taken] = -1
            if gain.max() <= 0:  # all covered: ProbCover then picks at random
                rest = [i for i in range(len(e)) if i not in taken]
                best = int(rng.choice(rest))
            else:
                best = int(np.argmax(gain))
            taken.append(best)
            uncovered &= ~adj[best]
        return Choice(
            [int(rows[i]) for i in taken],
            np.zeros(len(pool.ids)),
            f"ProbCover: delta {delta:.3g}, greedy coverage",
        )


@register
class RareStrategy(Strategy):
    name = "rare"
    description = (
        "the best expected share of the classes the labels hold least of, one per "
        "embedding cluster (typiclust without a model)"
    )

    def choose(self, pool: Pool) -> Choice:
        given = np.asarray(pool.state.class_pixels, float)
        if pool.cold or pool.class_probs is None or given.sum() <= 0:
            c = REGISTRY["typiclust"]().choose(pool)
            why = "no labelled pixels" if given.sum() <= 0 else "no predictions yet"
            return Choice(c.rows, c.combined, f"rare ({why}): {c.how}")
        a = pool.active
        f = np.clip(pool.class_probs, 0.0, None)  # no N x N here: every candidate counts
        n, nc = f.shape
        have = np.zeros(nc)
        have[: min(nc, len(given))] = given[:nc]
        if pool.pixels is not None and (pool.pixels > 0).all():
            px = pool.pixels.astype(float)
        else:  # areas unknown: as large as the mean labelled item
            px = np.full(n, have.sum() / max(pool.state.labeled, 1))
        n_clusters = min(n, max(pool.k, int(math.ceil(a.rare_clusters * pool.k))))
        clusters = _kmeans(pool.emb, n_clusters, pool.seed).labels_
        open_ = np.ones(n, bool)
        taken: list[int] = []
        first = np.zeros(n)
        needs: list[np.ndarray] = []
        for step in range(min(pool.k, n)):
            share = have / have.sum() if have.sum() > 0 else np.zeros(nc)
            need = 1.0 / np.maximum(share, a.rare_floor)
            need /= need.sum()
            gain = f @ need
            if step == 0:
                first = gain
            g = np.where(open_, gain, -np.inf)
            best = int(np.argmax(g))  # ties: the first row (a fixed order)
            if not np.isfinite(g[best]):
                break
            taken.append(best)
            needs.append(need)
            open_ &= clusters != clusters[best]
            if not open_.any():  # more picks than clusters: reopen the rest
                open_ = np.ones(n, bool)
                open_[taken] = False
            have = have + f[best] * px[best]
        w = ", ".join(f"{v:.2f}" for v in needs[0]) if needs else ""
        return Choice(
            taken,
            rank_normalise(first),
            f"rare: class needs [{w}] (1 / labelled share, normalised), {n_clusters} clusters",
        )


@register
class AutoStrategy(Strategy):
    name = "auto"
    description = "typiclust while few labels or a class unseen, then weighted uncertainty"

    def choose(self, pool: Pool) -> Choice:
        s = pool.state
        early = s.labeled < pool.active.auto_uncertainty_after or bool(s.classes_missing)
        if early or pool.cold:
            why = (
                f"{s.labeled} labelled < {pool.active.auto_uncertainty_after}"
                if s.labeled < pool.active.auto_uncertainty_after
                else f"classes {list(s.classes_missing)} in no label yet"
                if s.classes_missing
                else "no model yet"
            )
            c = REGISTRY["typiclust"]().choose(pool)
            return Choice(c.rows, c.combined, f"auto ({why}): {c.how}")
        c = REGISTRY["weighted"]().choose(pool)
        return Choice(c.rows, c.combined, f"auto (model knows every phase): {c.how}")


if tuple(REGISTRY) != SELECTION_STRATEGIES:  # params are checked against the config's names
    raise ImportError(f"config.SELECTION_STRATEGIES {SELECTION_STRATEGIES} != {tuple(REGISTRY)}")


def describe() -> dict[str, Any]:
    return {name: cls.description for name, cls in REGISTRY.items()}
