"""Model FLOPs of a training step and this machine's peak, for utilisation figures.

Model FLOP utilisation (MFU) = model FLOPs of the steps run (torch's flop counter on one
step, forward and backward; matrix multiplications and convolutions) / wall-clock time /
peak FLOP/s. The CPU peak is cores x FLOPs per cycle x clock: 64 fp32 FLOPs per cycle
per core with AVX-512 (two 16-wide FMA units), 32 with AVX2 + FMA (two 8-wide units, as
on Zen 3), 16 otherwise; the clock is the nominal one the kernel reports. A large fp32
matrix product is measured beside it as a sanity check (it reaches ~80-95 % of a true
peak).
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch

from srpu_pipelines.compute.device import usable_cores

# dense bfloat16 tensor-core peaks (TFLOP/s, without sparsity) by GPU name, for MFU
GPU_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "A10G": 70.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "RTX 4090": 165.0,
    "RTX 6000 Ada": 364.0,
    "RTX A6000": 155.0,
    "RTX 3090": 71.0,
    "V100": 125.0,
    "T4": 65.0,
}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpu_clock_ghz(cpuinfo: str | None = None) -> tuple[float, str]:
    """(GHz, where it came from): cpufreq's maximum, else /proc/cpuinfo's MHz."""
    f = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    try:
        return int(f.read_text()) / 1e6, str(f)
    except (OSError, ValueError):
        pass
    m = re.search(r"cpu MHz\s*:\s*([0-9.]+)", cpuinfo if cpuinfo is not None else _cpuinfo())
    if m:
        return float(m.group(1)) / 1000.0, "/proc/cpuinfo cpu MHz"
    return 0.0, "unknown"


def fp32_flops_per_cycle(flags: str) -> tuple[int, str]:
    """(fp32 FLOPs per cycle per core, the instruction set it assumes) from CPU flags."""
    have = set(flags.split())
    if "avx512f" in have:
        return 64, "avx512f (2 x 16-wide FMA)"
    if "avx2" in have and "fma" in have:
        return 32, "avx2+fma (2 x 8-wide FMA)"
    return 16, "sse/avx (no FMA assumed)"


def cpu_peak(cores: int | None = None) -> dict[str, Any]:
    """The CPU's fp32 peak in GFLOP/s and what it was computed from."""
    info = _cpuinfo()
    m = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    flags = m.group(1) if m else ""
    per_cycle, isa = fp32_flops_per_cycle(flags)
    ghz, source = cpu_clock_ghz(info)
    n = cores or usable_cores()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    return {
        "cpu": model.group(1).strip() if model else "unknown",
        "cores": n,
        "isa": isa,
        "flops_per_cycle_per_core": per_cycle,
        "clock_ghz": round(ghz, 3),
        "clock_source": source,
        "native_bf16": bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags)),
        "fp32_peak_gflops": round(n * per_cycle * ghz, 1),
    }


def matmul_gflops(
    dtype: torch.dtype = torch.float32, n: int = 4096, device: str = "cpu", repeats: int = 3
) -> float:
    """Measured GFLOP/s of an n x n matrix product (the practical ceiling)."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device != "cpu":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - t) / 1e9


def gpu_peak_tflops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (the longest matching key), None if unknown."""
    hits = [k for k in GPU_BF16_TFLOPS if k.lower() in name.lower()]
    return GPU_BF16_TFLOPS[max(hits, key=len)] if hits else None
