"""Named fault points, for the fault-injection tests (tests/test_faults.py).

``fault_point(name)`` does nothing unless the environment names that point
(``SRPU_FAULT_POINT=name``): then, at its ``SRPU_FAULT_SKIP``-th pass (0: the first), it
writes ``name pid`` to the file ``SRPU_FAULT_MARKER`` and waits, so that the test, which
sees the marker, kills the process with SIGKILL inside the operation (a temp file
written and not yet renamed, a version registered and no alias set yet, half a line
appended). Production runs never set these variables; the cost is one dict lookup.

The points: ``write:<file name>`` (every atomic write, between the temp file's fsync and
its rename), ``train:step`` and ``pretrain:step`` (after an optimiser step),
``score:image`` (after a pool image's record), ``round:item`` (after an item of a round
folder, before its summary), ``dvc:push`` (after ``dvc add``, before ``dvc push``),
``registry:alias`` (a version registered, its alias not set), ``promote:alias`` (the
gate passed, the champion alias not moved), ``history:append`` (half a history line
written).
"""

from __future__ import annotations

import os
import time

POINT_ENV, SKIP_ENV, MARKER_ENV = "SRPU_FAULT_POINT", "SRPU_FAULT_SKIP", "SRPU_FAULT_MARKER"
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    if os.environ.get(POINT_ENV) != name:
        return
    seen = _passes.get(name, 0)
    _passes[name] = seen + 1
    if seen < int(os.environ.get(SKIP_ENV) or 0):
        return
    marker = os.environ.get(MARKER_ENV)
    if marker:
        with open(marker, "w", encoding="utf-8") as fh:
            fh.write(f"{name} {os.getpid()}\n")
    time.sleep(600)  # the test kills this process now; alone, it carries on after 10 min
