"""The dataset index: every labelled pair and pool image, validated, hashed and split.

The index JSON is the one list of data the rest of the pipeline reads. Splits are
stratified by sub-dataset and by which rare classes an image holds, fixed by the seed,
and stable: an image already in the previous index keeps its split when others are added.
"""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from srpu_pipelines.config import DatasetSpec, Params
from srpu_pipelines.data.calibration import calibrate
from srpu_pipelines.data.discovery import Pair, PoolImage, Problem, find_labeled, find_pool
from srpu_pipelines.data.fingerprint import item_stats
from srpu_pipelines.data.imageio import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    read_grey,
    read_raw,
    to_grey,
)
from srpu_pipelines.data.masks import (
    MaskCodec,
    MaskDecodeError,
    class_fractions,
    item_mask,
    with_bar,
)
from srpu_pipelines.errors import InputError, MissingError, UserError
from srpu_pipelines.io.files import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
INDEX_VERSION = 3  # 2: fingerprint statistics; 3: pixel size, data bar, snapped pixels


class BadInputError(UserError, ValueError):
    """Input files that cannot be used; lists every file and its problem."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} input problem(s) (set data.on_bad_input: skip to list and skip "
            f"them instead):\n{lines}"
        )


def _posix(p: Path) -> str:
    return p.as_posix()


def _calibrate(path: Path, grey: np.ndarray, spec: DatasetSpec | None) -> dict[str, Any]:
    """Pixel size and data bar of one image: its sub-dataset's params, else the file."""
    if spec is None:
        return calibrate(path, grey)
    return calibrate(
        path, grey, spec.pixel_size_nm, spec.data_bar, f"data.datasets[{spec.name}].data_bar"
    )


def check_pair(
    pair: Pair, codec: MaskCodec, specs: dict[str, DatasetSpec] | None = None
) -> tuple[dict[str, Any] | None, Problem | None]:
    """Validate one labelled pair (image readable, mask decodes to the classes, same size,
    some pixel labelled): its index entry, or the problem with the file it names.

    A mask as tall as the image without its data bar (as public data sets ship them) is
    accepted when the bar is found at exactly that height; the bar's rows are not labelled."""
    spec = (specs or {}).get(pair.dataset)
    try:
        raw = read_raw(pair.image, palette="rgb")
        img = to_grey(raw)
        cal = _calibrate(pair.image, img, spec)
    except ImageReadError as e:
        return None, Problem(str(pair.image), str(e).split(": ", 1)[-1])
    try:
        mask, snapped = codec.decode_file_counted(pair.mask)
    except (ImageReadError, MaskDecodeError) as e:
        return None, Problem(str(pair.mask), str(e).split(": ", 1)[-1])
    h, w = img.shape
    rows = cal["data_bar_rows"]
    if rows >= h:
        return None, Problem(
            str(pair.image), f"data bar of {rows} rows is not below an image of {h} rows"
        )
    if mask.shape != img.shape:
        short = h - mask.shape[0]
        if mask.shape[1] == w and short > 0 and short == rows:
            pass  # the mask covers the image above its bar
        elif mask.shape[1] == w and short > 0:
            return None, Problem(
                str(pair.mask),
                f"mask size {w}x{mask.shape[0]} differs from image {pair.image.name} size "
                f"{w}x{h}: {short} rows shorter; a mask without the data bar is accepted "
                f"when the bar is that tall, but the bar "
                f"here is {rows} rows ({cal['data_bar_source']}); set "
                f"data.datasets[{pair.dataset}].data_bar: {short} if it is {short} rows",
            )
        else:
            return None, Problem(
                str(pair.mask),
                f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image "
                f"{pair.image.name} size {w}x{h} (width x height)",
            )
    mask = with_bar(mask, h, rows)
    if (mask == 255).all():
        return None, Problem(str(pair.mask), "mask has no labelled pixel")
    sample = slice(0, h - rows)  # the bar is no sample: not in the statistics
    entry = {
        "id": pair.id,
        "name": pair.name,
        "dataset": pair.dataset,
        "image": _posix(pair.image),
        "mask": _posix(pair.mask),
        "image_sha256": sha256_file(pair.image),
        "mask_sha256": sha256_file(pair.mask),
        "height": int(h),
        "width": int(w),
        "class_fractions": [round(f, 6) for f in class_fractions(mask, codec.num_classes)],
        "snapped_pixels": snapped,  # within mask.color_tolerance of a class colour
        "stats": item_stats(raw[sample], img[sample], mask[sample], codec.num_classes),
        **cal,
    }
    return entry, None


def _check_pool(
    img: PoolImage, specs: dict[str, DatasetSpec]
) -> tuple[dict[str, Any] | None, Problem | None]:
    spec = specs.get(img.dataset)
    try:
        grey = read_grey(img.image)  # decode once: a truncated file is caught now, not in round 5
        cal = _calibrate(img.image, grey, spec)
    except ImageReadError as e:
        return None, Problem(str(img.image), str(e).split(": ", 1)[-1])
    return {
        "id": img.id,
        "name": img.name,
        "dataset": img.dataset,
        "image": _posix(img.image),
        "image_sha256": sha256_file(img.image),
        "height": int(grey.shape[0]),
        "width": int(grey.shape[1]),
        **cal,
    }, None


def _order_key(seed: int, item_id: str) -> str:
    return hashlib.sha256(f"{seed}:{item_id}".encode()).hexdigest()


def assign_splits(
    items: list[dict[str, Any]],
    params: Params,
    previous: dict[str, str] | None = None,
    explicit: dict[str, str] | None = None,
) -> dict[str, str]:
    """Split per item id: explicit file first, then the previous index, then stratified.

    Validation and test are fixed per sub-dataset once they exist: a new image of a
    sub-dataset whose val and test splits the previous index already holds goes to train
    (a corrected mask from a round feeds training, and the gate, the stop rule and the
    history keep scoring the same images). Other new items (the first index, a new
    sub-dataset, one still without val or test) are placed one by one, in a seed-fixed
    order, into the split of their stratum (sub-dataset x rare classes present) that is
    furthest below its target share; ties go to the split furthest below target overall.
    """
    sp = params.data.split
    fractions = {"train": 1.0 - sp.val - sp.test, "val": sp.val, "test": sp.test}
    num = params.num_classes
    totals = np.zeros(num)
    for it in items:
        totals += np.asarray(it["class_fractions"])
    share = totals / max(totals.sum(), 1e-12)
    rare = [k for k in range(num) if share[k] < sp.rare_fraction]

    def stratum(it: dict[str, Any]) -> tuple:
        return (it["dataset"], tuple(k for k in rare if it["class_fractions"][k] > 0))

    out: dict[str, str] = {}
    for it in items:
        key_name = it["name"]
        if explicit and (it["id"] in explicit or key_name in explicit):
            out[it["id"]] = explicit.get(it["id"], explicit.get(key_name))
        elif previous and it["id"] in previous:
            out[it["id"]] = previous[it["id"]]
    held = [sp_ for sp_ in SPLITS if sp_ != "train" and fractions[sp_] > 0]
    seen: dict[str, set[str]] = {}
    for item_id, split in (previous or {}).items():
        seen.setdefault(item_id.split("/", 1)[0], set()).add(split)
    closed = {d for d, got in seen.items() if all(h in got for h in held)}
    for it in items:
        if it["id"] not in out and it["dataset"] in closed:
            out[it["id"]] = "train"
    sizes = Counter(stratum(it) for it in items)
    counts: dict[tuple, Counter] = {s: Counter() for s in sizes}
    overall: Counter = Counter()
    for it in items:
        if it["id"] in out:
            counts[stratum(it)][out[it["id"]]] += 1
            overall[out[it["id"]]] += 1
    new = sorted(
        (it for it in items if it["id"] not in out),
        key=lambda it: (stratum(it), _order_key(params.seed, it["id"])),
    )
    n_total = len(items)
    for it in new:
        s = stratum(it)

        def score(split: str, s: tuple = s) -> tuple[float, float]:
            local = fractions[split] * sizes[s] - counts[s][split]
            glob = fractions[split] * n_total - overall[split]
            # a stratum less than one item short of a split has no say: the overall
            # shortfall decides (else every single-image stratum would go to train)
            return (round(local, 6) if local >= 1 - 1e-9 else 0.0, round(glob, 6))

        best = max((sp_ for sp_ in SPLITS if fractions[sp_] > 0), key=score)
        out[it["id"]] = best
        counts[s][best] += 1
        overall[best] += 1
    return out


def _previous_splits(index_path: Path, record: Path | None = None) -> dict[str, str]:
    """Split of every id given one before: the existing index's (current items and
    remembered ones), then the split record's (``data.split.record``, versioned with the
    labels), which wins where they differ: it is the labels' own version."""
    out: dict[str, str] = {}
    if index_path.is_file():
        try:
            out.update(index_splits(read_json(index_path)))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise InputError(
                f"{index_path}: existing index is unreadable ({e}); move it away to rebuild "
                "splits from scratch"
            ) from None
    if record is not None and record.is_file():
        out.update(read_split_record(record))
    return out


def index_splits(index: dict[str, Any]) -> dict[str, str]:
    """Split of every id an index knows: its items' and the remembered ones'."""
    out = dict(index.get("split_memory", {}))
    out.update({it["id"]: it["split"] for it in index.get("items", [])})
    return out


def read_split_record(path: Path) -> dict[str, str]:
    """The split record: ``{"version": 1, "splits": {image id: split}}``."""
    data = read_json(path)
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict) or not all(
        isinstance(k, str) and v in SPLITS for k, v in splits.items()
    ):
        raise InputError(
            f"{path}: not an SRPU split record (expected {{'version': 1, 'splits': {{id: "
            f"one of {', '.join(SPLITS)}}}}}); restore it from git or DVC "
            "(`dvc checkout`), or move it away to let srpu index assign splits afresh"
        )
    return dict(splits)


def write_split_record(index: dict[str, Any], path: str | Path) -> bool:
    """Write the split of every image the index holds or remembers to ``path``
    (atomically, sorted, so that git and DVC see a change only when a split changes);
    return False (touching nothing) when it is unchanged."""
    path = Path(path)
    record = {"version": 1, "splits": dict(sorted(index_splits(index).items()))}
    if path.is_file() and read_json(path) == record:
        return False
    atomic_write_json(path, record)
    return True


def _load_split_file(path: Path) -> dict[str, str]:
    data = read_json(path)
    if not isinstance(data, dict):
        raise InputError(f"{path}: split file must map split names to lists of image names")
    out: dict[str, str] = {}
    for split, names in data.items():
        if not isinstance(names, list):
            raise InputError(f"{path}: split {split!r} must be a list of names")
        for n in names:
            name = str(n)
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                name = name[: -len(Path(name).suffix)]  # "img1.tif" names the image img1
            out[unicodedata.normalize("NFC", name)] = str(split)
    return out


def build_index(params: Params, show_progress: bool = True) -> dict[str, Any]:
    """Scan every sub-dataset, validate each file, and return the index as a dict.

    Raises :class:`BadInputError` listing all problems unless ``data.on_bad_input`` is
    ``skip``, in which case problems are logged and listed under ``skipped``.
    """
    codec = MaskCodec.from_params(params)
    pairs: list[Pair] = []
    pool: list[PoolImage] = []
    problems: list[Problem] = []
    for spec in params.data.datasets:
        p, pr = find_labeled(spec, params.mask.suffix)
        pairs += p
        problems += pr
        q, qr = find_pool(spec)
        pool += q
        problems += qr
    labeled_ids = {p.id for p in pairs}
    specs = {d.name: d for d in params.data.datasets}
    items: list[dict[str, Any]] = []
    for pair in tqdm(pairs, desc="index: labelled pairs", disable=not show_progress, unit="pair"):
        entry, prob = check_pair(pair, codec, specs)
        if prob:
            problems.append(prob)
        else:
            items.append(entry)
    pool_items: list[dict[str, Any]] = []
    for img in tqdm(pool, desc="index: pool images", disable=not show_progress, unit="img"):
        if img.id in labeled_ids:
            continue  # labelled since it entered the pool: the label wins
        entry, prob = _check_pool(img, specs)
        if prob:
            problems.append(prob)
        else:
            pool_items.append(entry)
    if problems and params.data.on_bad_input == "error":
        raise BadInputError(problems)
    for p in problems:
        log.warning("skipped %s", p)

    previous = _previous_splits(Path(params.data.index_path), params.data.split.record)
    explicit = None
    unmatched: list[str] = []
    if params.data.split.split_file is not None:
        explicit = _load_split_file(Path(params.data.split.split_file))
        known = {it["id"] for it in items} | {it["name"] for it in items}
        unmatched = sorted(n for n in explicit if n not in known)
        for n in unmatched:
            log.warning("%s: %r matches no labelled image", params.data.split.split_file, n)
    splits = assign_splits(items, params, previous, explicit)
    for it in items:
        it["split"] = splits[it["id"]]
    current = {it["id"] for it in items}
    # Images that left the index (skipped while a mask is fixed, moved away) keep their
    # split for when they come back: a test image must never return as a train image.
    memory = {k: v for k, v in sorted(previous.items()) if k not in current}
    items.sort(key=lambda it: it["id"])
    pool_items.sort(key=lambda it: it["id"])
    return {
        "version": INDEX_VERSION,
        "classes": [c.name for c in params.classes],
        # the params overrides; each entry has its own
        "pixel_size_nm": {d.name: d.pixel_size_nm for d in params.data.datasets},
        "items": items,
        "pool": pool_items,
        "skipped": [{"path": p.path, "reason": p.reason} for p in problems],
        "split_memory": memory,
        "split_file_unmatched": unmatched,
        "counts": {
            "labeled": len(items),
            "pool": len(pool_items),
            "skipped": len(problems),
            **{s: sum(1 for it in items if it["split"] == s) for s in sorted(set(splits.values()))},
        },
    }


def write_index(index: dict[str, Any], path: str | Path) -> bool:
    """Write the index atomically; return False (and touch nothing) when it is unchanged."""
    path = Path(path)
    if path.is_file():
        try:
            if read_json(path) == index:
                return False
        except ValueError:
            pass  # unreadable old index: replace it
    atomic_write_json(path, index)
    return True


def load_index(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"{path}: dataset index not found; run `srpu index` first")
    idx = read_json(path)
    if not isinstance(idx, dict) or idx.get("version") != INDEX_VERSION or "items" not in idx:
        raise InputError(
            f"{path}: not an SRPU dataset index of version {INDEX_VERSION} (found version "
            f"{idx.get('version') if isinstance(idx, dict) else None!r}): run `srpu index` "
            "to rebuild it (splits are kept)"
        )
    return idx


def image_hashes(index: dict[str, Any]) -> dict[str, str]:
    """Image path -> content hash, for labelled items and pool images."""
    return {it["image"]: it["image_sha256"] for it in index["items"] + index.get("pool", [])}


def select_items(
    index: dict[str, Any], splits: list[str], datasets: list[str] | None = None
) -> list[dict[str, Any]]:
    """Index items in the given splits (and sub-datasets, when given)."""
    return [
        it
        for it in index["items"]
        if it["split"] in splits and (datasets is None or it["dataset"] in datasets)
    ]


def verify_items(index: dict[str, Any], params: Params) -> dict[str, list[str]]:
    """Re-read every indexed pair: masks that no longer decode, sizes that differ, and
    files changed since indexing. Returns {"decode": [...], "size": [...], "changed": [...]}."""
    codec = MaskCodec.from_params(params)
    out: dict[str, list[str]] = {"decode": [], "size": [], "changed": []}
    for it in index["items"]:
        try:
            mask = item_mask(it, codec)
        except (ImageReadError, MaskDecodeError) as e:
            out["decode"].append(str(e))
            continue
        if mask.shape != (it["height"], it["width"]):
            out["size"].append(
                f"{it['mask']}: {mask.shape[1]}x{mask.shape[0]} vs image "
                f"{it['width']}x{it['height']}"
            )
        if (
            sha256_file(it["image"]) != it["image_sha256"]
            or sha256_file(it["mask"]) != it["mask_sha256"]
        ):
            out["changed"].append(f"{it['id']}: changed since indexing; run `srpu index`")
    return out


def missing_classes_per_split(
    index: dict[str, Any], class_names: list[str]
) -> dict[str, list[str]]:
    """{split: [classes with no labelled pixel in that split]} for the train/val/test splits."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        items = [it for it in index["items"] if it["split"] == split]
        if not items:
            out[split] = list(class_names)
            continue
        total = np.sum([it["class_fractions"] for it in items], axis=0)
        missing = [n for n, t in zip(class_names, total, strict=True) if t <= 0]
        if missing:
            out[split] = missing
    return out
