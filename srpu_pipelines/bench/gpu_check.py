"""The GPU check: SRPU's core on a bare CUDA machine, in under 5 minutes, JSON out.

    PYTHONPATH=. python3 -m srpu_pipelines.bench.gpu_check [--steps 300] [--out DIR]

(``tools/gpu_check.sh`` installs the carried wheels first.) It needs only the core's
packages: no Dagster, MLflow or DVC, none of ../shared. On synthetic demo data it makes
itself, it

1. trains the shipped default model (params.yaml ``model``; tile and batch of ``train``)
   on the device for ``--steps`` steps, then a GPU-sized batch (``--gpu-batch`` tiles of
   ``--gpu-tile`` px) of the same model, through the one loop (bf16 autocast where the
   GPU has it, channels-last, torch.compile as ``train.compile: auto`` says);
2. reports steps/s over the steady part of each run (after the first epoch, which holds
   compilation and cuDNN's algorithm search), model FLOPs per step and their
   utilisation of the GPU's dense bf16 peak (MFU), and peak GPU memory;
3. loads the GPU-trained best checkpoint on the CPU and checks that it predicts the same
   labels there as on the GPU (fp32 on both: >= 99.9 % of pixels; the agreement of GPU
   bf16 with CPU fp32 is reported beside it);
4. segments an 8192 x 8192 mosaic on the GPU and reports the time and peak memory (the
   probability map streams in row bands).

Run with ``--device cpu --steps 4 --gpu-steps 2 --mosaic 512`` it is a smoke test that
runs anywhere (the test suite does that).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srpu_pipelines.analysis.inference import input_scale, predict_labels
from srpu_pipelines.bench.common import on_demo_data
from srpu_pipelines.compute import flops as F
from srpu_pipelines.compute.device import Precision, resolve_device, resolve_runtime
from srpu_pipelines.config import load_params, stage_setup
from srpu_pipelines.data.dataset import load_samples
from srpu_pipelines.data.index import select_items
from srpu_pipelines.data.masks import MaskCodec
from srpu_pipelines.models.checkpoint import load_model
from srpu_pipelines.training.loop import run_task
from srpu_pipelines.training.plan import plan_stage
from srpu_pipelines.training.trainer import StageTask, train_stage

ROOT = Path(__file__).resolve().parents[2]


def _params(work: Path, device: str, size: int):
    p, index = on_demo_data(load_params(ROOT / "params.yaml"), work, size)
    p.train.device = p.inference.device = device
    return p, index


def _train(p, index, work: Path, name: str, steps: int, batch: int, tile: int) -> dict[str, Any]:
    setup = stage_setup(p)
    tp = setup.train.model_copy(
        update={
            "out_dir": work / name,
            "max_steps": steps,
            "steps_per_epoch": max(1, steps // 5),
            "batch_size": batch,
            "tile_size": tile,
            "encoder": "full",
            "semi": setup.train.semi.model_copy(update={"enabled": False}),
        }
    )
    setup = setup.model_copy(update={"train": tp})
    rt = resolve_runtime(tp.device, tp.precision, tp.channels_last, "train")
    # one eager step, FLOPs counted (the flop counter does not see inside compiled code)
    once = tp.model_copy(
        update={"out_dir": work / f"{name}_flops", "max_steps": 1, "compile": "off"}
    )
    counted = run_task(
        StageTask(setup.model_copy(update={"train": once}), index), progress=False, count_flops=True
    )
    flops = counted.info["step_flops"]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    marks: list[tuple[int, float]] = []

    def mark(rec: dict[str, Any]) -> None:  # after each epoch, incl. its validation
        if rt.device.type == "cuda":
            torch.cuda.synchronize(rt.device)
        marks.append((rec["step"], time.perf_counter()))

    t0 = time.perf_counter()
    res = train_stage(setup, index, callbacks=[mark], progress=False)
    wall = time.perf_counter() - t0
    # steady state: from the end of the first epoch to the end of the run
    (s0, t1), (s1, t2) = marks[0], marks[-1]
    rate = (s1 - s0) / (t2 - t1) if s1 > s0 else res.steps / wall
    out = {
        "batch": batch,
        "tile": tile,
        "steps": res.steps,
        "wall_s": round(wall, 1),
        "steady_steps_per_s": round(rate, 2),
        "images_per_s": round(rate * batch, 1),
        "gflop_per_step": round(flops / 1e9, 2),
        "runtime": rt.describe(),
        "compiled": tp.compile == "on" or (tp.compile == "auto" and rt.device.type == "cuda"),
        "best_val_miou": round(res.best_miou, 4),
    }
    if rt.device.type == "cuda":
        name_ = torch.cuda.get_device_name(rt.device)
        peak = F.gpu_peak_tflops(name_)
        out["model_tflops_per_s"] = round(rate * flops / 1e12, 2)
        out["mfu_pct_of_bf16_peak"] = round(100 * rate * flops / 1e12 / peak, 2) if peak else None
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(rt.device) / 2**30, 2)
    return {"result": out, "checkpoint": res.best_checkpoint}


def _agreement(p, index, ckpt: Path, device: str) -> dict[str, Any]:
    """Labels of the device-trained checkpoint on the device vs on the CPU."""
    items = select_items(index, ["val", "test"])
    samples = load_samples(items, MaskCodec.from_params(p), progress=False)
    inf = p.inference
    kw = dict(tile=inf.tile_size, overlap=inf.overlap, batch_size=inf.batch_size)
    cpu_model, cfg = load_model(ckpt)
    dev_model, _ = load_model(ckpt)
    dev = resolve_device(device)
    dev_model.to(dev)
    bf16 = Precision(dev.type, torch.bfloat16)
    same32, same16, n = 0, 0, 0
    for s in samples:
        scale = input_scale(cfg, s.pixel_size_nm)  # the pixels the model learnt at
        ref = predict_labels(cpu_model, s.normalized, scale, **kw)
        on32 = predict_labels(dev_model, s.normalized, scale, **kw)
        on16 = predict_labels(dev_model, s.normalized, scale, precision=bf16, **kw)
        same32 += int((on32 == ref).sum())
        same16 += int((on16 == ref).sum())
        n += ref.size
    a32, a16 = same32 / n, same16 / n
    return {
        "images": len(samples),
        "fp32_device_vs_cpu": round(a32, 5),
        "bf16_device_vs_cpu_fp32": round(a16, 5),
        # the check: a checkpoint trained on the device predicts on the CPU what it
        # predicts there (cuDNN and oneDNN round differently: a few pixels may differ);
        # bf16 against fp32 is shown beside it, it is no part of the check
        "passed": a32 >= 0.999,
    }


def _mosaic(ckpt: Path, size: int, device: str) -> dict[str, Any]:
    model, cfg = load_model(ckpt)
    dev = resolve_device(device)
    model.to(dev).to(memory_format=torch.channels_last)
    img = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    prec = Precision(dev.type, torch.bfloat16 if dev.type == "cuda" else None)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t = time.perf_counter()
    labels = predict_labels(
        model, img, tile=512, overlap=0.25, batch_size=32, precision=prec, channels_last=True
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    out = {
        "size": size,
        "seconds": round(time.perf_counter() - t, 2),
        "labels_shape": list(labels.shape),
    }
    if dev.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test"
    )
    ap.add_argument("--steps", type=int, default=300, help="steps of the shipped batch")
    ap.add_argument("--gpu-steps", type=int, default=200, help="steps of the GPU-sized batch")
    ap.add_argument("--gpu-batch", type=int, default=32)
    ap.add_argument("--gpu-tile", type=int, default=256)
    ap.add_argument("--mosaic", type=int, default=8192, help="side of the mosaic to segment")
    ap.add_argument("--size", type=int, default=512, help="side of the synthetic micrographs")
    ap.add_argument("--out", help="also write the JSON here")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device", "torch": torch.__version__}))
        return 2
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="srpu-gpu-check-") as tmp:
        work = Path(tmp)
        p, index = _params(work, a.device, size=a.size)
        report: dict[str, Any] = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
        }
        tp = plan_stage(stage_setup(p), index)[0].train  # the shipped params on this device
        shipped = _train(p, index, work, "shipped", a.steps, tp.batch_size, tp.tile_size)
        report["shipped_batch"] = shipped["result"]
        report["gpu_batch"] = _train(p, index, work, "gpu", a.gpu_steps, a.gpu_batch, a.gpu_tile)[
            "result"
        ]
        report["cpu_agreement"] = _agreement(p, index, shipped["checkpoint"], a.device)
        report["mosaic"] = _mosaic(shipped["checkpoint"], a.mosaic, a.device)
    report["total_s"] = round(time.perf_counter() - t0, 1)
    # the check runs the core alone: nothing of the orchestration stack may be loaded
    report["orchestration_imported"] = sorted(
        m for m in ("dagster", "mlflow", "dvc") if m in sys.modules
    )
    text = json.dumps(report, indent=2)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    return 0 if report["cpu_agreement"]["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
