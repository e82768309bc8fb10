"""``srpu bench speed``: training throughput in model FLOPs against the machine's peak.

Each arm is a whole supervised training run as ``srpu train`` does it (data loading,
validation, checkpoints inside the wall clock) on the synthetic demo data, from scratch,
with the full encoder training and no semi-supervision:

- ``default``: the shipped model, tile and batch (``model`` and ``train`` of params);
- ``light``: the same U-Net one encoder stage shallower with half the decoder widths;
- ``peer``: ``../shared/bench/peer_baseline.py`` (a plain smp loop: U-Net resnet18 with
  smp's default decoder, batch 8 of 256 px, fp32), run as its own process on the same
  images; its clock starts after it has loaded them and stops before its test scoring.

Per run: model FLOPs per step (torch's flop counter on one step), steps, wall seconds,
steps/s, images/s, model GFLOP/s and its share of the CPU's fp32 peak (or of the GPU's
bf16 peak). Seeds and arms are interleaved so that drift of a shared machine's speed hits
every arm alike.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from srpu_pipelines.bench.common import on_demo_data, peer_layout, run_peer, run_setup, spread
from srpu_pipelines.compute import flops as F
from srpu_pipelines.compute.device import Runtime, resolve_runtime, set_threads
from srpu_pipelines.config import LoopParams, ModelParams, Params
from srpu_pipelines.errors import InputError, MissingError
from srpu_pipelines.training.loop import Task, run_task
from srpu_pipelines.training.plan import plan_model, plan_stage
from srpu_pipelines.training.trainer import StageTask

SPEED_ARMS = ("default", "light", "peer")
PEER_BATCH, PEER_TILE = 8, 256


def light_model(m: ModelParams) -> ModelParams:
    """One encoder stage fewer and half the decoder widths (at least 8)."""
    depth = max(3, m.encoder_depth - 1)
    widths = m.decoder_channels or [256, 128, 64, 32, 16][: m.encoder_depth]
    return m.model_copy(
        update={
            "encoder_depth": depth,
            "decoder_channels": [max(8, w // 2) for w in widths[:depth]],
        }
    )


class PeerTask(Task):
    """The peer loop's model and step (smp U-Net resnet18, default decoder, fp32, batch 8
    of 256 px), on random data: run for one step only, to count its model FLOPs."""

    kind = "peer"

    def __init__(self, lp: LoopParams, num_classes: int) -> None:
        super().__init__(lp, 0)
        self.num_classes = num_classes

    def fingerprint(self) -> str:
        return f"peer-{self.num_classes}"

    def config(self) -> dict[str, Any]:
        return {"kind": "peer"}

    def build(self) -> torch.nn.Module:
        import segmentation_models_pytorch as smp

        return smp.Unet("resnet18", encoder_weights=None, in_channels=1, classes=self.num_classes)

    def batches(self, loop, epoch: int):
        x = torch.randn(PEER_BATCH, 1, PEER_TILE, PEER_TILE)
        y = torch.randint(0, self.num_classes, (PEER_BATCH, PEER_TILE, PEER_TILE))
        return [(x, y)]

    def train_step(self, loop, module, batch):
        return torch.nn.functional.cross_entropy(module(batch[0]), batch[1]), {}


def peer_step_flops(num_classes: int, work: Path) -> int:
    lp = LoopParams(
        out_dir=work,
        max_steps=1,
        resume=False,
        device="cpu",
        precision="fp32",
        channels_last="off",
        compile="off",
        workers=0,
    )
    return int(
        run_task(PeerTask(lp, num_classes), progress=False, count_flops=True).info["step_flops"]
    )


def _row(arm: str, seed: int, steps: int, seconds: float, batch: int, flops: int, peak: float):
    gflops = steps * flops / seconds / 1e9
    return {
        "arm": arm,
        "seed": seed,
        "steps": steps,
        "wall_s": round(seconds, 4),
        "steps_per_s": round(steps / seconds, 3),
        "images_per_s": round(steps * batch / seconds, 2),
        "model_gflops_per_s": round(gflops, 1),
        "pct_of_peak": round(100 * gflops / peak, 1),
    }


def bench_speed(
    params: Params,
    seeds: int,
    steps: int,
    budget_s: float | None,
    work_dir: Path,
    arms: tuple[str, ...] = SPEED_ARMS,
    peer_script: Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every arm for every seed (interleaved) and report throughput (see module doc)."""
    if steps < 1:
        raise InputError(f"bench speed: --steps must be >= 1, got {steps}")
    work_dir = Path(work_dir)
    p, index = on_demo_data(params, work_dir)
    rt = resolve_runtime(p.train.device, p.train.precision, p.train.channels_last, "train")
    set_threads(p.train.threads)
    host = _host(rt)
    peak = host["peak_gflops"]
    if p.model.is_auto:  # the model the plan gives this budget on this device
        arm = _arm_setup(p, p.model, 0, work_dir / "model_plan", budget_s, steps)
        p.model = plan_model(p.model, arm.train, p.class_names, index, save=False)[0]
    models = {"default": p.model, "light": light_model(p.model)}
    flops = {
        a: _count_flops(p, models[a], index, work_dir / f"flops_{a}", budget_s, steps)
        for a in arms
        if a in models
    }
    peer_data = None
    if "peer" in arms:
        if peer_script is None or not peer_script.is_file():
            raise MissingError(f"bench speed: peer script {peer_script} not found")
        flops["peer"] = peer_step_flops(p.num_classes, work_dir / "peer_flops")
        peer_data = peer_layout(p, index, work_dir / "peer_data", ["train"], ["val", "test"])
    rows = []
    for seed in range(seeds):
        # what the shared machine delivers right now: an fp32 matrix product beside the runs
        ceiling = F.matmul_gflops(torch.float32) if rt.device.type == "cpu" else None
        for arm in arms:
            if arm == "peer":
                r = run_peer(peer_script, peer_data, p.num_classes, seed, steps=steps)
                row = _row(arm, seed, r["steps"], r["train_s"], PEER_BATCH, flops[arm], peak)
            else:
                row = _stage_row(
                    p, arm, models[arm], seed, steps, budget_s, work_dir, flops[arm], peak
                )
            if ceiling:
                row["fp32_matmul_gflops"] = round(ceiling, 1)
                row["pct_of_fp32_matmul"] = round(100 * row["model_gflops_per_s"] / ceiling, 1)
            rows.append(row)
            if progress:
                print(json.dumps(row), file=sys.stderr, flush=True)
    summary = {}
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        summary[arm] = {
            "gflop_per_step": round(flops[arm] / 1e9, 2),
            **{
                k: spread([r[k] for r in rs])
                for k in ("images_per_s", "model_gflops_per_s", "pct_of_peak", "pct_of_fp32_matmul")
                if all(k in r for r in rs)
            },
        }
    if "peer" in summary:
        for arm, s in summary.items():
            if arm != "peer":
                peer = summary["peer"]
                s["vs_peer_images_per_s"] = round(
                    s["images_per_s"]["mean"] / peer["images_per_s"]["mean"], 2
                )
                s["vs_peer_model_gflops"] = round(
                    s["model_gflops_per_s"]["mean"] / peer["model_gflops_per_s"]["mean"], 2
                )
    return {
        "bench": "speed",
        "host": host,
        "runtime": rt.describe(),
        "step_budget": steps,
        "budget_s": budget_s,
        "shipped": {
            "model": p.model.model_dump(mode="json"),
            "tile": p.train.tile_size,  # auto: the plan's value is in each run's row
            "batch": p.train.batch_size,
        },
        "light_model": models["light"].model_dump(mode="json"),
        "arms": summary,
        "runs": rows,
    }


def _arm_setup(p: Params, model_p: ModelParams, seed: int, out: Path, budget_s, steps: int):
    q = p.model_copy(deep=True)
    q.seed, q.model = seed, model_p
    q.train.encoder, q.train.semi.enabled = "full", False
    shutil.rmtree(out, ignore_errors=True)
    return run_setup(q, out, budget_s, steps)


def _count_flops(
    p: Params, model_p: ModelParams, index: dict, out: Path, budget_s, steps: int
) -> int:
    """Model FLOPs of one eager step of the arm's training (counted apart from the timed
    runs: the flop counter does not see inside compiled code, and costs time itself), at
    the tile and batch the plan gives the timed runs' budget."""
    setup, _ = plan_stage(_arm_setup(p, model_p, 0, out, budget_s, steps), index)
    tp = setup.train.model_copy(update={"compile": "off", "max_steps": 1, "budget_s": None})
    res = run_task(
        StageTask(setup.model_copy(update={"train": tp}), index), progress=False, count_flops=True
    )
    shutil.rmtree(out, ignore_errors=True)
    return int(res.info["step_flops"])


def _stage_row(p, arm, model_p, seed, steps, budget_s, work_dir, flops, peak) -> dict[str, Any]:
    """One whole training run of the arm (data, validation, checkpoints in the clock)."""
    out = work_dir / "runs" / f"{arm}_seed{seed}"
    setup = _arm_setup(p, model_p, seed, out, budget_s, steps)
    index = json.loads(Path(p.data.index_path).read_text())
    t = time.perf_counter()
    task = StageTask(setup, index)  # the plan sets the keys left auto
    res = run_task(task, progress=False)
    wall = time.perf_counter() - t
    row = _row(arm, seed, res.steps, wall, task.tp.batch_size, flops, peak)
    row["tile"], row["batch"] = task.tp.tile_size, task.tp.batch_size
    row["validation_s"] = res.info.get("validation_seconds")
    row["val_miou"] = round(res.best_miou, 4)
    for f in out.glob("*.pt"):
        f.unlink()  # throughput is what this benchmark keeps
    return row


def _host(rt: Runtime) -> dict[str, Any]:
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        tflops = F.gpu_peak_tflops(name)
        return {
            "device": name,
            "peak": "dense bf16 tensor-core peak" if tflops else "unknown GPU: no peak",
            "peak_gflops": (tflops or float("nan")) * 1000,
            "matmul_bf16_gflops": round(F.matmul_gflops(torch.bfloat16, 8192, "cuda"), 1),
        }
    cpu = F.cpu_peak()
    return {
        **cpu,
        "peak": "cpu fp32 peak = cores x fp32 FLOPs/cycle x clock",
        "peak_gflops": cpu["fp32_peak_gflops"],
        "matmul_fp32_gflops": round(F.matmul_gflops(torch.float32), 1),
        "matmul_bf16_gflops": round(F.matmul_gflops(torch.bfloat16), 1)
        if cpu["native_bf16"]
        else None,
    }
