"""The one training loop. Supervised stages, MAE pretraining and the benchmarks run here.

As in nnU-Net's ``run_training``, :func:`run_task` is a short driver over the hooks of a
:class:`Task`; a kind of training supplies only what differs (the model, its batches, one
step's loss, what an epoch's end scores and saves). The loop owns everything else, once:

- the run's fingerprint (settings, data and start weights, by content) and what a saved
  ``last.pt`` means: resume it, start over (other settings, a changed model layout), or
  nothing to do (a finished run with the same fingerprint);
- the step budget and the wall-clock budget, and the learning-rate schedule (linear
  warm-up, cosine to ``min_lr_ratio``) scaled per parameter group by its ``lr_scale``;
- where it runs: device, autocast precision (a gradient scaler for float16),
  channels-last layout, ``torch.compile``, threads, DataLoader workers, and data-parallel
  processes (each trains on its slice of every global batch; only rank 0 writes);
- checkpoints (``last.pt``: weights, optimiser, scaler, step, history, fingerprint), the
  history and the epoch callbacks.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from srpu_pipelines.compute import distributed as dist
from srpu_pipelines.compute.device import (
    Runtime,
    maybe_compile,
    prepare_module,
    resolve_device,
    resolve_precision,
    set_threads,
    to_device,
    usable_cores,
    use_channels_last,
)
from srpu_pipelines.errors import DivergedError, InputError
from srpu_pipelines.io.faults import fault_point
from srpu_pipelines.models.checkpoint import read_checkpoint, save_checkpoint
from srpu_pipelines.training.task import (  # noqa: F401 (re-exported: the loop's contract)
    EXECUTION_KEYS,
    EpochCallback,
    RunResult,
    Task,
    lr_factor,
    seed_everything,
)

log = logging.getLogger(__name__)


def resolve_workers(setting: int | str, device: torch.device, processes: int = 1) -> int:
    """``auto``: no worker on a small CPU (a worker would take a core from the model,
    whose step dwarfs the crops), a few where there are cores to spare or a GPU to feed
    (this process's share of the cores, when several processes train together)."""
    if setting != "auto":
        return int(setting)
    cores = usable_cores() // max(1, processes)
    if device.type == "cuda":
        return min(8, max(1, cores - 1))
    return 0 if cores < 8 else min(4, cores // 4)


class EpochSampler(torch.utils.data.Sampler[int]):
    """Indices ``epoch * length + i`` for ``i`` in this process's slice of every global
    batch. A dataset derives all randomness of item ``i`` from (seed, epoch, i), so the
    data do not depend on the number of workers or processes, and a run resumed at an
    epoch boundary sees what it would have seen."""

    def __init__(self, length: int, global_batch: int, d: dist.Dist, key: str = "batch_size"):
        if global_batch % d.world:
            raise InputError(
                f"{key} {global_batch} does not split over {d.world} processes; "
                "make it a multiple of the process count"
            )
        self.length, self.global_batch, self.d, self.epoch = length, global_batch, d, 0
        self.local = global_batch // d.world

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.length // self.global_batch) * self.local

    def __iter__(self) -> Iterator[int]:
        base = self.epoch * self.length
        for b in range(self.length // self.global_batch):
            start = b * self.global_batch + self.d.rank * self.local
            yield from range(base + start, base + start + self.local)


class WeightAverage:
    """An exponential moving average of a model's weights (as timm's ``ModelEmaV3``): a
    copy in eval mode, updated after every optimiser step with
    ``w_avg += (1 - d) * (w - w_avg)``, ``d = min(decay, (1 + n) / (10 + n))`` after n
    updates (so the random start weights fade at once); buffers (BatchNorm statistics)
    are copied. Averaged weights score higher and vary less from run to run than the
    weights of any single step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        import copy

        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0
        self._avg = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        self._bufs = list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        live = [p for p in model.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(self._avg, live, 1.0 - d)
        for mine, theirs in zip(self._bufs, model.buffers(), strict=True):
            mine.copy_(theirs)

    def state_dict(self) -> dict[str, Any]:
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        return {"weights": state, "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])


class Loop:
    """One run of a task; hooks see it as their context (runtime, step, epoch, clock)."""

    def __init__(
        self,
        task: Task,
        callbacks: list[EpochCallback] | None = None,
        progress: bool = True,
        count_flops: bool = False,
    ) -> None:
        self.task, self.lp = task, task.lp
        self.callbacks, self.progress = list(callbacks or []), progress
        self.count_flops, self.step_flops, self._counted = count_flops, 0, False
        self.dist = dist.from_env()
        self.out = Path(self.lp.out_dir)
        self.last_path = self.out / "last.pt"
        self.step = self.epoch = 0
        self.best, self.best_epoch = -math.inf, -1
        self.history: list[dict[str, Any]] = []
        self.finishing = False  # the epoch ending now is the run's last
        self.start_score: float | None = None  # the start weights' score (Task.score_start)
        self.lr = 0.0
        self._elapsed0 = 0.0
        self._t0 = time.monotonic()
        self._fp: str | None = None
        self._module: nn.Module | None = None
        self.ema: WeightAverage | None = None

    @property
    def eval_model(self) -> nn.Module:
        """The weights that are scored and kept as best: the average, where there is one."""
        return self.ema.module if self.ema is not None else self.model

    # -- the runtime ---------------------------------------------------------------------
    def runtime(self) -> Runtime:
        lp = self.lp
        dev = resolve_device(lp.device, f"{self.task.kind}.device")
        if self.dist.active and dev.type == "cuda":
            dev = torch.device("cuda", self.dist.local_rank)
        return Runtime(
            dev,
            resolve_precision(lp.precision, dev, f"{self.task.kind}.precision"),
            use_channels_last(lp.channels_last, dev),
        )

    @property
    def fingerprint(self) -> str:
        if self._fp is None:
            self._fp = self.task.fingerprint()
        return self._fp

    def elapsed(self) -> float:
        return time.monotonic() - self._t0

    def out_of_budget(self) -> bool:
        lp = self.lp
        return self.step >= lp.total_steps or (
            lp.budget_s is not None and self.elapsed() >= lp.budget_s
        )

    def loader(self, dataset: torch.utils.data.Dataset, global_batch: int, key: str = "") -> Any:
        """A DataLoader over ``dataset`` for this process's share of each global batch,
        with the workers and pinned memory the runtime wants; ``.sampler.set_epoch(e)``
        before each epoch. ``key`` names the batch size's params key in errors."""
        workers = resolve_workers(self.lp.workers, self.rt.device, self.dist.world)
        key = key or f"{self.task.kind}.batch_size"
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=global_batch // self.dist.world,
            sampler=EpochSampler(len(dataset), global_batch, self.dist, key),
            num_workers=workers,
            pin_memory=self.rt.device.type == "cuda",
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        return to_device(x, self.rt.device, self.rt.channels_last)

    # -- saved state --------------------------------------------------------------------
    def saved_state(self) -> dict[str, Any] | None:
        """last.pt when it belongs to this run; None when there is none or the run starts
        over (other settings with ``restart_on_change``); an error otherwise."""
        if not (self.lp.resume and self.last_path.is_file()):
            return None
        state = read_checkpoint(self.last_path)[0]
        if state.get("fingerprint") != self.fingerprint:
            if not self.task.restart_on_change:
                raise self.task.mismatch_error(self.last_path)
            log.info("%s: settings or data changed; %s starts over", self.last_path, self.task.kind)
            self._discard()
            return None
        return state

    def is_done(self, state: dict[str, Any] | None) -> bool:
        """A saved run of today's model layout that ended on its step or time budget:
        resuming it trains nothing."""
        if state is None or not state.get("finished") or not self.task.outputs_exist():
            return False
        budget = self.lp.budget_s
        spent = int(state["step"]) >= self.lp.total_steps or (
            budget is not None and float(state["elapsed_s"]) >= budget
        )
        return spent and self.layout_fits(state)

    def built(self) -> nn.Module:
        """The task's module, built once (on the CPU until the run moves it)."""
        if self._module is None:
            self._module = self.task.build()
        return self._module

    def layout_fits(self, state: dict[str, Any]) -> bool:
        """Does last.pt hold the tensors of the model as this version builds it?"""
        return set(state["model"]) == set(self.built().state_dict())

    def _discard(self) -> None:
        if self.dist.is_main:
            self.task.on_restart()

    def _restore(self, state: dict[str, Any], model: nn.Module, opt, scaler) -> bool:
        if not self.layout_fits(state):
            # written by a version that built this model with other tensors: it cannot
            # resume (the optimiser state would not fit either)
            log.info("%s: the model's layout changed since; training starts over", self.last_path)
            self._discard()
            return False
        model.load_state_dict(state["model"])
        # the saved groups' settings would replace this run's: keep how it steps
        own = [{k: g.get(k) for k in ("lr_scale", "fused", "foreach")} for g in opt.param_groups]
        opt.load_state_dict(state["optimizer"])
        for g, keep in zip(opt.param_groups, own, strict=True):
            g.update(keep)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        self._counters(state)
        self.best, self.best_epoch = self.task.recover_best(self.best, self.best_epoch)
        log.info(
            "resumed %s at epoch %d, step %d (best %.4f)",
            self.last_path,
            self.epoch,
            self.step,
            self.best,
        )
        return True

    def _counters(self, state: dict[str, Any]) -> None:
        """Step, epoch, best score, history and clock of a saved run."""
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.best, self.best_epoch = float(state["best_score"]), int(state["best_epoch"])
        self.history = list(state["history"])
        self.start_score = state.get("start_score")  # absent in runs saved before keep_start
        self._elapsed0 = float(state["elapsed_s"])
        self._t0 = time.monotonic() - self._elapsed0

    def _result(self, trained: bool, resumed: bool, losses: list[float]) -> RunResult:
        return RunResult(
            self.out,
            self.step,
            self.epoch,
            self.elapsed(),
            self.history,
            self.best if math.isfinite(self.best) else math.nan,
            self.best_epoch,
            resumed,
            trained,
            step_losses=losses,
        )

    def save_last(self, model: nn.Module, opt, scaler, finished: bool) -> None:
        payload = {
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "step": self.step,
            "epoch": self.epoch,
            "best_score": self.best,
            "best_epoch": self.best_epoch,
            "elapsed_s": self.elapsed(),
            "history": self.history,
            "start_score": self.start_score,
            "fingerprint": self.fingerprint,
            "finished": finished,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }
        save_checkpoint(self.last_path, model, {**self.task.config(), "epoch": self.epoch}, payload)

    # -- the driver -----------------------------------------------------------------------
    def run(self) -> RunResult:
        """Resume or start, train until the budget is spent, return the outcome."""
        self.rt = self.runtime()
        set_threads(self.lp.threads, self.dist.world if self.rt.device.type == "cpu" else 1)
        # the same initial weights on every process (DDP also broadcasts rank 0's)
        seed_everything(self.task.seed)
        state = self.saved_state()
        if self.is_done(state):
            assert state is not None
            self._counters(state)
            result = self._result(trained=False, resumed=True, losses=[])
            self.task.summarize(result)
            return result
        dist.init(self.dist, self.rt.device)
        model = self.built()
        sync = self.lp.sync_bn != "off" and self.task.sync_batchnorm
        if sync and self.dist.active and self.rt.device.type == "cuda":
            # BatchNorm statistics over the global batch (SyncBatchNorm runs on GPUs only;
            # on CPUs each process keeps its own)
            model = self._module = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        prepare_module(model, self.rt.device, self.rt.channels_last)
        # the fused kernel: one pass over the parameters, not one per tensor (measured
        # here: 10 ms instead of 42 ms a step for the shipped U-Net's 14 M parameters)
        opt = torch.optim.AdamW(
            self.task.param_groups(model),
            lr=self.lp.lr,
            weight_decay=self.lp.weight_decay,
            betas=self.task.betas,
            fused=True,
        )
        scaler = self.rt.precision.grad_scaler()
        decay = float(self.lp.ema)
        self.ema = WeightAverage(model, decay) if decay > 0 else None
        resumed = state is not None and self._restore(state, model, opt, scaler)
        self.model, self.opt = model, opt
        self.task.on_train_start(self)
        start, losses = self.step, self._train(model, opt, scaler)
        result = self._result(trained=self.step > start, resumed=resumed, losses=losses)
        if self.count_flops:
            result.info["step_flops"] = self.step_flops
        self.task.summarize(result)
        if self.dist.is_main:
            self.task.on_train_end(self, result)
        dist.barrier(self.dist)  # the next stage starts together (the group stays)
        return result

    def _wrap(self, model: nn.Module) -> nn.Module:
        net = model
        if self.dist.active:
            ids = [self.rt.device.index] if self.rt.device.type == "cuda" else None
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=ids, find_unused_parameters=self.task.find_unused_parameters
            )
        return maybe_compile(net, self.lp.compile, self.rt.device)

    def _train(self, model: nn.Module, opt, scaler) -> list[float]:
        net, losses = self._wrap(model), []
        if self.step == 0 and self.dist.is_main:  # a fresh run (not a resumed one)
            # scored before the clock starts: the start's validation is not training time
            self.start_score = self.task.score_start(self)
            if self.start_score is not None and self.start_score > self.best:
                self.best, self.best_epoch = self.start_score, 0
                self.task.save_best(self, {"epoch": 0, "step": 0, "val_miou": self.start_score})
        # the budget's clock runs from the first step (data loading is not in it), on
        # from where a resumed run stopped; every process goes by rank 0's clock
        self._t0 = time.monotonic() - self._elapsed0
        last_save = time.monotonic()
        self.finishing = dist.broadcast_flag(self.out_of_budget(), self.dist, self.rt.device)
        if self.finishing and self.best_epoch == 0 and self.dist.is_main:
            # no budget left for an epoch: the kept start is the run's outcome
            self.task.save_outputs(self, {})
            self.save_last(model, opt, scaler, finished=True)
        while not self.finishing:
            epoch_losses, logs, stopped = self._epoch(model, net, opt, scaler)
            losses += epoch_losses
            self.epoch += 1
            self.finishing = dist.broadcast_flag(
                stopped or self.out_of_budget(), self.dist, self.rt.device
            )
            rec = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": float(np.mean(epoch_losses)) if epoch_losses else math.nan,
                "lr": self.lr,
                **{k: float(np.mean(v)) for k, v in logs.items()},
            }
            if not self.dist.is_main:
                continue  # the others wait at the next step's gradient exchange
            score = self.task.on_epoch_end(self, rec)
            rec["elapsed_s"] = round(self.elapsed(), 1)
            if score is not None and score > self.best:
                self.best, self.best_epoch = score, self.epoch
                self.task.save_best(self, rec)
            self.history.append(rec)
            if self.finishing or time.monotonic() - last_save >= self.lp.checkpoint_every_s:
                self.task.save_outputs(self, rec)
                self.save_last(model, opt, scaler, finished=self.finishing)
                last_save = time.monotonic()
            self._report(rec)
            if self.callbacks:  # progress for the watcher: rate, and time left by steps/budget
                rate = self.step / max(self.elapsed(), 1e-9)
                left = (self.lp.total_steps - self.step) / max(rate, 1e-9)
                if self.lp.budget_s is not None:
                    left = min(left, max(self.lp.budget_s - self.elapsed(), 0.0))
                info = {
                    **rec,
                    "total_steps": self.lp.total_steps,
                    "steps_per_s": round(rate, 3),
                    "eta_s": 0.0 if self.finishing else round(left, 1),
                }
                for cb in self.callbacks:
                    cb(info)
        return losses

    def _epoch(self, model: nn.Module, net: nn.Module, opt, scaler):
        """One epoch of steps: (each step's loss, averaged over processes; the values the
        task logged; whether the budget ran out). Losses stay on the device until the
        epoch ends: a GPU is not made to wait for the host at every step."""
        task, lp = self.task, self.lp
        task.train_mode(model)
        losses: list[torch.Tensor] = []
        logs: dict[str, list[Any]] = defaultdict(list)
        stopped = False
        bar = tqdm(
            task.batches(self, self.epoch),
            desc=f"{task.kind} epoch {self.epoch + 1}",
            disable=not (self.progress and self.dist.is_main),
            leave=False,
        )
        for batch in bar:
            prog = self.step / lp.total_steps
            if lp.budget_s is not None:
                prog = max(prog, self.elapsed() / lp.budget_s)
            self.lr = lp.lr * lr_factor(prog, self.step, lp.warmup_steps, lp.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = self.lr * g.get("lr_scale", 1.0)
            counting = self.count_flops and not self._counted
            with FlopCounterMode(display=False) if counting else nullcontext() as counter:
                loss, values = self._step(net, opt, scaler, batch)
            if self.ema is not None:
                self.ema.update(model)
            if counting:
                self.step_flops, self._counted = int(counter.get_total_flops()), True
            self.step += 1
            fault_point(f"{task.kind}:step")
            losses.append(loss.detach().float())
            for k, v in values.items():
                logs[k].append(v)
            if bar.disable is False and self.step % 10 == 0:
                bar.set_postfix(loss=f"{float(loss):.3f}", lr=f"{self.lr:.2e}")
            over = self.out_of_budget()
            if lp.budget_s is not None:  # clocks differ: stop where any process's ran out
                over = dist.any_flag(over, self.dist, self.rt.device)
            if over:
                stopped = True
                break
        return self._epoch_losses(losses), self._floats(logs), stopped

    def _epoch_losses(self, losses: list[torch.Tensor]) -> list[float]:
        if not losses:
            return []
        t = dist.mean_over_processes(torch.stack(losses), self.dist)
        bad = (~torch.isfinite(t)).nonzero()
        if len(bad):
            first = self.step - len(losses) + int(bad[0, 0])
            raise DivergedError(
                f"{self.task.kind} loss became {float(t[bad[0, 0]])} at step {first}; lower "
                f"the learning rate ({self.task.kind}.lr = {self.lp.lr})"
            )
        return [float(v) for v in t.cpu()]

    @staticmethod
    def _floats(logs: dict[str, list[Any]]) -> dict[str, list[float]]:
        return {k: [float(v) for v in vs] for k, vs in logs.items()}

    def _step(self, net: nn.Module, opt, scaler, batch: Any) -> tuple[torch.Tensor, dict]:
        """Forward (autocast), backward (scaled for float16), optimiser step. A non-finite
        loss is caught at the epoch's end (checking here would stall a GPU every step)."""
        with self.rt.precision.autocast():
            loss, values = self.task.train_step(self, net, batch)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss, values

    def _report(self, rec: dict[str, Any]) -> None:
        if not self.progress:
            return
        score = next((f"{k} {rec[k]:.4f}" for k in ("val_miou",) if k in rec), "")
        tqdm.write(
            f"{self.task.kind} epoch {rec['epoch']}: step {rec['step']}, loss "
            f"{rec['loss']:.4f}{', ' + score if score else ''}, {rec['elapsed_s']:.0f}s"
        )


def run_task(
    task: Task,
    callbacks: list[EpochCallback] | None = None,
    progress: bool = True,
    count_flops: bool = False,
) -> RunResult:
    """Run ``task`` in the loop: resume, train within its budget, checkpoint. With
    ``count_flops`` the model FLOPs of its first step (torch's flop counter, forward and
    backward) are in ``result.info["step_flops"]``."""
    return Loop(task, callbacks, progress, count_flops).run()


def task_is_finished(task: Task) -> bool:
    """Would :func:`run_task` find ``task``'s run done and train nothing?"""
    loop = Loop(task, progress=False)
    if not (task.lp.resume and loop.last_path.is_file()):
        return False
    state = read_checkpoint(loop.last_path)[0]
    return state.get("fingerprint") == loop.fingerprint and loop.is_done(state)
