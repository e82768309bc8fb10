"""What a kind of training gives the one loop (:class:`Task`), and what it gets back
(:class:`RunResult`). See :mod:`srpu_pipelines.training.loop` for the driver."""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from srpu_pipelines.config import LoopParams

if TYPE_CHECKING:
    from srpu_pipelines.training.loop import Loop

EpochCallback = Callable[[dict[str, Any]], None]
# settings of how a run executes, not of what it learns: left out of the fingerprint,
# so a run may resume on another device or with another budget
EXECUTION_KEYS = {
    "out_dir",
    "resume",
    "epochs",
    "max_steps",
    "budget_s",
    "threads",
    "device",
    "precision",
    "channels_last",
    "compile",
    "workers",
    "checkpoint_every_s",
    "sync_bn",
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(progress: float, step: int, warmup_steps: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine from 1 to ``min_ratio``.

    ``progress`` in [0, 1] is the share of the run done: steps or seconds, whichever is
    further along, so a time-budgeted run still ends on a small learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    p = min(max(progress, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


@dataclass
class RunResult:
    """The outcome of one run of the loop (a supervised stage or MAE pretraining)."""

    out_dir: Path
    steps: int
    epochs: int
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    best_score: float = math.nan
    best_epoch: int = -1
    resumed: bool = False
    trained: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    step_losses: list[float] = field(default_factory=list)  # this call's steps, all ranks

    # supervised stages
    @property
    def best_miou(self) -> float:
        return self.best_score

    @property
    def train_seconds(self) -> float:
        return self.seconds

    @property
    def best_checkpoint(self) -> Path:
        return self.out_dir / "best.pt"

    @property
    def last_checkpoint(self) -> Path:
        return self.out_dir / "last.pt"

    # MAE pretraining
    @property
    def encoder_checkpoint(self) -> Path:
        return self.out_dir / "encoder.pt"

    @property
    def reconstructions(self) -> Path:
        return self.out_dir / "reconstructions.png"

    @property
    def method(self) -> str:
        return str(self.info.get("method", ""))

    @property
    def images(self) -> int:
        return int(self.info.get("images", 0))

    def summary(self) -> dict[str, Any]:
        best = self.best_score if math.isfinite(self.best_score) else None
        return {
            **self.info,
            "best_score": best,
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
            "steps": self.steps,
            "seconds": round(self.seconds, 1),
            "history": self.history,
        }


class Task:
    """What a kind of training supplies to the loop. Defaults do nothing."""

    kind = "training"  # names the run in log lines and errors
    restart_on_change = False  # a last.pt of other settings: start over (else an error)
    betas = (0.9, 0.999)
    # data-parallel: does the module hold parameters a step never uses (e.g. a timm ViT's
    # unused parts)? DDP then looks for them every step, which costs time
    find_unused_parameters = False
    # may BatchNorm layers become SyncBatchNorm (new modules: hooks on the old ones go)?
    sync_batchnorm = True

    def __init__(self, lp: LoopParams, seed: int) -> None:
        self.lp, self.seed = lp, seed

    # -- identity and outputs -------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of everything the result depends on (settings, data, start weights)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The JSON config written beside every checkpoint."""
        raise NotImplementedError

    def outputs_exist(self) -> bool:
        """Are the files a finished run leaves still there (besides last.pt)?"""
        return True

    def mismatch_error(self, last: Path) -> Exception:
        return ValueError(f"{last}: holds a {self.kind} run with other settings or data")

    def on_restart(self) -> None:
        """A saved run is discarded: forget what belonged to it."""

    def recover_best(self, best: float, epoch: int) -> tuple[float, int]:
        """On resume: a best score newer than last.pt's (written just before a kill)."""
        return best, epoch

    # -- the model and its data -----------------------------------------------------------
    def build(self) -> nn.Module:
        """The module that trains (its state_dict is last.pt's ``model``), on the CPU."""
        raise NotImplementedError

    def param_groups(self, module: nn.Module) -> list[dict[str, Any]]:
        """Optimiser groups, each with an ``lr_scale`` (timm's convention)."""
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr_scale": 1.0}]

    def on_train_start(self, loop: Loop) -> None:
        """Load data; called only when steps will run."""

    def batches(self, loop: Loop, epoch: int) -> Iterable[Any]:
        raise NotImplementedError

    def train_mode(self, module: nn.Module) -> None:
        module.train()

    # -- one step and the epoch's end -------------------------------------------------
    def train_step(
        self, loop: Loop, module: nn.Module, batch: Any
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Forward pass and loss of one batch (under autocast): (loss, values to log)."""
        raise NotImplementedError

    def score_start(self, loop: Loop) -> float | None:
        """Score the start weights before the first step, so that they compete for the
        best checkpoint (None: they do not). Rank 0 only."""
        return None

    def on_epoch_end(self, loop: Loop, rec: dict[str, Any]) -> float | None:
        """Score the epoch (higher is better; None: not scored this epoch). Rank 0 only."""
        return None

    def save_best(self, loop: Loop, rec: dict[str, Any]) -> None:
        """The epoch just scored best: keep its weights. Rank 0 only."""

    def save_outputs(self, loop: Loop, rec: dict[str, Any]) -> None:
        """Files written with every last.pt, just before it. Rank 0 only."""

    def summarize(self, result: RunResult) -> None:
        """Fill in ``result`` (its ``info``, what its best score means); every process,
        also when the run was already done."""

    def on_train_end(self, loop: Loop, result: RunResult) -> None:
        """Steps ran: write the run's last outputs. Rank 0 only."""
