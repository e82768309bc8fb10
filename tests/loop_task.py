"""A tiny task for the one loop (a conv net without BatchNorm on random 8 x 8 images), and
a worker entry point for the data-parallel tests:

    python -m torch.distributed.run --nproc-per-node 2 ... -m tests.loop_task OUT GB STEPS
    python -m tests.loop_task OUT GB STEPS            # one process

Rank 0 writes ``{"losses": [...], "steps": N, "resumed": bool}`` to OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from srpu_pipelines.compute.distributed import from_env
from srpu_pipelines.config import LoopParams
from srpu_pipelines.training.loop import Loop, Task, run_task


class ToyData(torch.utils.data.Dataset):
    def __init__(self, length: int, seed: int = 0) -> None:
        self.length, self.seed = length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, int(index)])
        x = rng.standard_normal((1, 8, 8))
        y = (x[0] > 0).astype(np.int64) + (x[0] > 1)  # 3 classes, learnable
        return torch.from_numpy(x), torch.from_numpy(y)


class TinyTask(Task):
    kind = "tiny"

    def fingerprint(self) -> str:
        return "tiny-v1"

    def config(self) -> dict:
        return {"kind": "tiny"}

    def build(self) -> nn.Module:
        torch.manual_seed(123)
        # float64: Adam's first steps amplify float32 rounding (sums in another order
        # across processes) into differences of ~1e-4; in float64 they stay ~1e-12
        net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1))
        return net.double()

    def on_train_start(self, loop: Loop) -> None:
        lp = self.lp
        self.loader = loop.loader(ToyData(lp.steps_per_epoch * lp.batch_size), lp.batch_size)

    def batches(self, loop: Loop, epoch: int):
        self.loader.sampler.set_epoch(epoch)
        return self.loader

    def train_step(self, loop: Loop, module: nn.Module, batch):
        x, y = loop.to_device(batch[0]), loop.to_device(batch[1])
        return F.cross_entropy(module(x), y), {}


def tiny_params(out: Path, batch: int, steps: int, **kw) -> LoopParams:
    base = dict(
        out_dir=out,
        epochs=steps,
        steps_per_epoch=1,
        batch_size=batch,
        lr=0.05,
        warmup_steps=2,
        threads=1,
        device="cpu",
        compile="off",
        workers=0,
        checkpoint_every_s=0,  # after every epoch: the resume test cuts in between
    )
    return LoopParams(**{**base, **kw})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("batch", type=int)
    ap.add_argument("steps", type=int)
    ap.add_argument("--crash-after-epoch", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    task = TinyTask(tiny_params(out.parent / "run", a.batch, a.steps), seed=0)

    def crash(rec: dict) -> None:  # a failure right after this epoch's checkpoint
        if rec["epoch"] == a.crash_after_epoch:
            raise SystemExit(3)

    res = run_task(task, callbacks=[crash] if a.crash_after_epoch else None, progress=False)
    if from_env().is_main:
        out.write_text(
            json.dumps({"losses": res.step_losses, "steps": res.steps, "resumed": res.resumed})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
