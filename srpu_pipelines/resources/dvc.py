"""DVC owns data and labels: an interface, the DVC command line, and a recording fake.

Labelled folders are committed through the DVC-tracked folder that holds them (the
folder itself or a parent with ``FOLDER.dvc`` beside it, e.g. ``data/demo/labeled.dvc``
for ``data/demo/labeled/nmc_lpsc``); folders DVC does not track are reported. ``dvc add``
stores the new content in the cache (every earlier version stays there and in the
remote, none is overwritten) and rewrites ``FOLDER.dvc``; ``dvc push`` copies it to the
default remote when one is set. Commit ``FOLDER.dvc`` with git to name the version.
"""

from __future__ import annotations

import abc
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from srpu_pipelines.errors import DvcError, MissingError
from srpu_pipelines.io.faults import fault_point

log = logging.getLogger(__name__)


def tracked_folders(folders: list[Path]) -> tuple[list[Path], list[Path]]:
    """(the DVC-tracked folders that hold ``folders``: each folder or its nearest parent
    with a ``.dvc`` file beside it, unique and in order; the folders none holds)."""
    out: list[Path] = []
    untracked: list[Path] = []
    for f in folders:
        f = Path(f)
        owner = next((d for d in [f, *f.parents] if d.name and Path(f"{d}.dvc").is_file()), None)
        if owner is None:
            untracked.append(f)
        elif owner not in out:
            out.append(owner)
    return out, untracked


def dvc_md5(folder: Path) -> str | None:
    """The content hash ``FOLDER.dvc`` records for the folder."""
    try:
        outs = yaml.safe_load(Path(f"{folder}.dvc").read_text(encoding="utf-8"))["outs"]
        return str(outs[0]["md5"])
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return None


class Dvc(abc.ABC):
    @abc.abstractmethod
    def add(self, folders: list[Path]) -> dict[str, str | None]:
        """Commit the current content of the tracked folders that hold ``folders``;
        returns {tracked folder: md5}."""


def _dvc_binary() -> str:
    here = Path(sys.executable).parent / "dvc"  # the shim `make setup` installs into .venv
    found = str(here) if here.exists() else shutil.which("dvc")
    if not found:
        raise MissingError("dvc not found: run `make setup` (it installs .venv-dvc)")
    return found


class DvcCli(Dvc):
    """Runs ``dvc add`` (and ``dvc push`` when a default remote is set) in the repository
    that holds the folders; waits for DVC's repository lock rather than failing on it."""

    def __init__(self, push: bool = True, timeout_s: float = 600):
        self.push, self.timeout_s = push, timeout_s

    def _run(self, cwd: Path, *args: str) -> str:
        env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
        out = subprocess.run(
            [_dvc_binary(), *args],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=self.timeout_s,
        )
        if out.returncode != 0:
            raise DvcError(
                f"dvc {' '.join(args)} failed in {cwd} (exit {out.returncode}):\n"
                f"{(out.stderr or out.stdout)[-2000:]}"
            )
        return out.stdout

    @staticmethod
    def _repo_root(folder: Path) -> Path:
        for d in [folder.resolve(), *folder.resolve().parents]:
            if (d / ".dvc").is_dir():
                return d
        raise MissingError(f"{folder}: not inside a DVC repository (no .dvc folder above)")

    def _default_remote(self, root: Path) -> str | None:
        """The default remote's name, or None when none is configured. ``dvc config
        core.remote`` prints nothing (exit 0) for "none"; a damaged config or any other
        failure raises :class:`DvcError` (it once read as "no remote": the push was
        skipped without a word)."""
        return self._run(root, "config", "core.remote").strip() or None

    def add(self, folders: list[Path]) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for f in tracked_folders(folders)[0]:
            root = self._repo_root(f)
            rel = os.path.relpath(f.resolve(), root)
            self._run(root, "add", rel)  # not --quiet: a failure says why
            fault_point("dvc:push")
            if self.push and self._default_remote(root):
                self._run(root, "push", f"{rel}.dvc")
            out[str(f)] = dvc_md5(f)
        return out


class RecordingDvc(Dvc):
    """Fake for tests: records what would be committed."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def add(self, folders: list[Path]) -> dict[str, str | None]:
        tracked = tracked_folders(folders)[0]
        self.calls.append([str(f) for f in tracked])
        return {str(f): dvc_md5(f) for f in tracked}
