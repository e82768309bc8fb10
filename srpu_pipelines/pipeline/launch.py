"""Data-parallel training runs: ``srpu train --nproc N`` (and the training asset with
``nproc``) start ``torchrun`` with N processes of ``srpu train`` on this machine.

The parent resolves what the workers cannot do alone: a stage that starts from a
registry alias (``alias:champion``) is pinned to the checkpoint file of that version
first, so the workers never query the registry; rank 0 then tracks, registers and writes
the stage's record as a one-process run would.
"""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

from srpu_pipelines.compute.distributed import launch_command, launch_env
from srpu_pipelines.config import Params
from srpu_pipelines.errors import InputError
from srpu_pipelines.resources.tracking import Tracker

log = logging.getLogger(__name__)


def pinned_inits(params: Params, tracker: Tracker | None, stages: list[str]) -> list[str]:
    """``--set`` overrides that replace ``alias:`` starts of ``stages`` by the file of the
    version the alias names now."""
    out = []
    for i, st in enumerate(params.stages):
        if st.name in stages and st.init_kind == "alias":
            if tracker is None:
                raise InputError(
                    f"stage {st.name!r}: init {st.init!r} needs the model registry "
                    "(tracking.enabled: true)"
                )
            path = tracker.fetch_checkpoint(st.init_arg, Path(params.predict.models_cache))
            out.append(f"stages.{i}.init={json.dumps(f'file:{path}')}")  # YAML-safe text
    return out


def train_argv(params_file: str, overrides: list[str], stage: str | None, quiet: bool) -> list[str]:
    """The ``srpu`` arguments each worker runs."""
    argv = ["--params", params_file]
    for ov in overrides:
        argv += ["--set", ov]
    if quiet:
        argv.append("-q")
    argv.append("train")
    if stage:
        argv += ["--stage", stage]
    return argv


def launch_train(
    params: Params,
    params_file: str,
    overrides: list[str],
    tracker: Tracker | None,
    nproc: int,
    stage: str | None = None,
    quiet: bool = False,
) -> int:
    """Run the training stages (or ``stage``) in ``nproc`` processes; the exit status of
    torchrun (0 when every process finished)."""
    names = [stage] if stage else [s.name for s in params.stages]
    pins = pinned_inits(params, tracker, names)
    argv = train_argv(params_file, [*overrides, *pins], stage, quiet)
    cmd = launch_command(nproc, "srpu_pipelines.cli", argv)
    log.info("data-parallel training in %d processes: %s", nproc, " ".join(cmd))
    return subprocess.run(cmd, env=launch_env(nproc), check=False).returncode
