"""The history of active-learning rounds, one JSON line per round, and when to stop.

``active.out_dir/history.jsonl`` gets one line each time a round finishes (new labels
indexed, model retrained, evaluated, maybe promoted, pool re-scored, next batch
selected): what was labelled, the correction effort (Dice between predicted and
corrected mask), validation mIoU before and after, and the batch selected next. Lines
are only ever appended, never rewritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from srpu_pipelines.config import Params
from srpu_pipelines.errors import InputError
from srpu_pipelines.io.faults import fault_point
from srpu_pipelines.io.files import json_safe

log = logging.getLogger(__name__)


def history_path(params: Params) -> Path:
    return Path(params.active.out_dir) / "history.jsonl"


def read_history(params: Params) -> list[dict[str, Any]]:
    """Every recorded round, oldest first. Only a torn last line (a crash while
    appending: no newline at its end) is left out, with a warning; a damaged line before
    it, or a repeated round number, is an error naming the file and the line: skipping it
    would hide a round and repeat its number."""
    path = history_path(params)
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # after the last newline: "" unless torn
    out: list[dict[str, Any]] = []
    for n, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path}: line {n} is damaged ({e}); only a torn last line is tolerated. "
                "Restore the file from its backup or mend the line by hand"
            ) from None
        if not isinstance(entry, dict) or not isinstance(entry.get("round"), int):
            raise InputError(f"{path}: line {n} is not a round entry (no integer 'round')")
        if out and entry["round"] <= out[-1]["round"]:
            raise InputError(
                f"{path}: line {n} repeats round {entry['round']} (or goes back); round "
                "numbers must rise"
            )
        out.append(entry)
    if torn.strip():
        log.warning("%s: torn last line left out (a crash while appending): %r", path, torn[:80])
    return out


def next_round(history: list[dict[str, Any]]) -> int:
    """The number of the next entry: one above the highest (not the line count)."""
    return max((h["round"] for h in history), default=0) + 1


def append_history(params: Params, entry: dict[str, Any]) -> None:
    """Append one line (flushed and synced: a crash leaves the earlier lines whole). A
    torn last line is first moved to ``history.jsonl.torn`` (kept, never glued to the
    new line)."""
    path = history_path(params)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(entry), sort_keys=True, ensure_ascii=False, allow_nan=False)
    if path.is_file():
        with open(path, "rb+") as fh:
            data = fh.read()
            cut = data.rfind(b"\n") + 1
            if cut < len(data):  # a torn tail
                with open(path.with_name(path.name + ".torn"), "ab") as keep:
                    keep.write(data[cut:] + b"\n")
                    keep.flush()
                    os.fsync(keep.fileno())
                fh.truncate(cut)
                fh.flush()
                os.fsync(fh.fileno())
    with open(path, "a", encoding="utf-8") as fh:
        half = len(line) // 2  # two writes, as a long line may land: a crash tears it
        fh.write(line[:half])
        fh.flush()
        fault_point("history:append")
        fh.write(line[half:] + "\n")
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
