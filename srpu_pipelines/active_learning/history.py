"""The history of active-learning rounds, one JSON line per round, and when to stop.

``active.out_dir/history.jsonl`` gets one line each time a round finishes (new labels
indexed, model retrained, evaluated, maybe promoted, pool re-scored, next batch
selected): what was labelled, the correction effort (Dice between predicted and
corrected mask), validation mIoU before and after, and the batch selected next. Lines
are only ever appended, never rewritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from srpu_pipelines.config import Params
from srpu_pipelines.io.files import json_safe


def history_path(params: Params) -> Path:
    return Path(params.active.out_dir) / "history.jsonl"


def read_history(params: Params) -> list[dict[str, Any]]:
    """Every recorded round, oldest first; a damaged last line (a crash while appending)
    is skipped with the others kept."""
    path = history_path(params)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def append_history(params: Params, entry: dict[str, Any]) -> None:
    """Append one line (flushed and synced: a crash leaves the earlier lines whole)."""
    path = history_path(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(entry), sort_keys=True, ensure_ascii=False, allow_nan=False)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def stop_reason(params: Params, history: list[dict[str, Any]]) -> str | None:
    """Why active learning should stop, or None: ``active.max_rounds`` rounds with
    corrected masks done, or the champion's validation mIoU gained less than
    ``stop_min_gain`` in each of the last ``stop_patience`` such rounds (a round whose
    model was not promoted gained nothing)."""
    a = params.active
    done = sum(1 for h in history if h.get("corrected"))  # not the first, label-less entry
    if done >= a.max_rounds:
        return f"{done} rounds done (active.max_rounds: {a.max_rounds})"
    gains = [
        h["val_miou_after"] - h["val_miou_before"]
        for h in history
        if h.get("corrected")
        and h.get("val_miou_after") is not None
        and h.get("val_miou_before") is not None
    ]
    last = gains[-a.stop_patience :]
    if len(last) == a.stop_patience and all(g < a.stop_min_gain for g in last):
        return (
            f"validation mIoU gained less than {a.stop_min_gain} (active.stop_min_gain) in "
            f"each of the last {a.stop_patience} rounds: {[round(g, 4) for g in last]}"
        )
    return None
