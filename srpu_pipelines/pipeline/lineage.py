"""Lineage: every registered model version traces back to its labels, rounds, params and code.

At registration a version gets these tags (``srpu.lineage.*``):

- ``git_commit``: the project's commit (``+dirty`` when tracked files differ from it);
- ``data_md5``: the DVC md5 of each tracked labelled folder (``FOLDER.dvc``), as JSON;
- ``index``: the hash of the dataset index (every file by its own hash, and the splits);
- ``params``: the hash of the stage's resolved params (the run holds them in full);
- ``rounds``: the active-learning rounds whose corrected masks are in its training split,
  with how many of their picks it trained on, as JSON.

``srpu lineage [MODEL_URI]`` prints the chain version -> data -> rounds -> params -> commit;
the ``champion_model`` asset shows it in Dagster.
"""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from srpu_pipelines.config import Params
from srpu_pipelines.errors import InputError, NotFoundError
from srpu_pipelines.resources.tracking import Tracker

log = logging.getLogger(__name__)
PREFIX = "srpu.lineage."
PACKAGE_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = PACKAGE_ROOT) -> str:
    """HEAD of the checkout that holds the code (``+dirty`` with uncommitted changes to
    tracked files), or "unknown (...)" outside a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return f"unknown ({head.stderr.strip()[:120] or 'not a git checkout'})"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except FileNotFoundError:
        return "unknown (git is not installed)"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def params_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]


def trained_rounds(params: Params, index: dict[str, Any]) -> dict[str, int]:
    """{round number: how many of its corrected masks are in the training split}."""
    from srpu_pipelines.active_learning.history import read_history

    train = {it["id"] for it in index["items"] if it["split"] in params.train.splits}
    out: dict[str, int] = {}
    for h in read_history(params):
        n = sum(1 for i in h.get("corrected", []) if i in train)
        if n:
            out[str(h["round"])] = n
    return out


def lineage_tags(
    params: Params, index: dict[str, Any], index_hash: str, resolved: dict[str, Any]
) -> dict[str, str]:
    """The ``srpu.lineage.*`` tags of a version trained now on ``index``."""
    from srpu_pipelines.resources.dvc import dvc_md5, tracked_folders

    labelled = [Path(d.labeled) for d in params.data.datasets if d.labeled is not None]
    tracked, untracked = tracked_folders(labelled)
    md5 = {str(f): dvc_md5(f) for f in tracked}
    md5.update({str(f): None for f in untracked})  # null: not under DVC
    return {
        f"{PREFIX}git_commit": git_commit(),
        f"{PREFIX}data_md5": json.dumps(md5, sort_keys=True),
        f"{PREFIX}index": index_hash,
        f"{PREFIX}params": params_hash(resolved),
        f"{PREFIX}rounds": json.dumps(trained_rounds(params, index), sort_keys=True),
    }


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, alias, version)."""
    if not uri.startswith("models:/"):
        raise InputError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    rest = uri.removeprefix("models:/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, alias, None
    name, _, version = rest.partition("/")
    if not version:
        raise InputError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    return name, None, version


def lineage(tracker: Tracker, uri: str) -> dict[str, Any]:
    """The chain of a registered version: {version, run_id, commit, data_md5, index,
    params, rounds}; a version registered before lineage tags existed has them None."""
    name, alias, version = parse_model_uri(uri)
    if name != tracker.registered_model:
        raise InputError(
            f"{uri}: this project registers {tracker.registered_model!r} "
            "(tracking.registered_model)"
        )
    mv = tracker.get_alias(alias) if alias else tracker.get_version(version or "")
    if mv is None:
        raise NotFoundError(f"{uri}: no such version in the registry")
    t = mv.tags

    def js(key: str) -> Any:
        raw = t.get(PREFIX + key)
        return json.loads(raw) if raw is not None else None

    return {
        "uri": uri,
        "version": mv.version,
        "run_id": mv.run_id,
        "val_miou": mv.val_miou,
        "index": t.get(PREFIX + "index", t.get("data_revision")),
        "data_md5": js("data_md5"),
        "rounds": js("rounds"),
        "params": t.get(PREFIX + "params"),
        "git_commit": t.get(PREFIX + "git_commit"),
    }


def format_lineage(d: dict[str, Any]) -> str:
    """The chain, one link per line."""
    unknown = "not recorded (registered before lineage tags)"
    md5 = d["data_md5"]
    data = ", ".join(f"{k}: {v or 'not under DVC'}" for k, v in md5.items()) if md5 else unknown
    rounds = d["rounds"]
    if rounds is None:
        rtxt = unknown
    elif not rounds:
        rtxt = "none (trained on the labels it started with)"
    else:
        rtxt = ", ".join(f"round {r} ({n} picks)" for r, n in rounds.items())
    miou = "" if d["val_miou"] is None else f", val mIoU {d['val_miou']:.4f}"
    return "\n".join(
        [
            f"{d['uri']} -> version {d['version']} (run {d['run_id']}{miou})",
            f"  -> data: index {d['index'] or unknown}; DVC md5 {data}",
            f"  -> rounds: {rtxt}",
            f"  -> params: {d['params'] or unknown}",
            f"  -> commit: {d['git_commit'] or unknown}",
        ]
    )
