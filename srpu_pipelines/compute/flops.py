"""Model FLOPs of a training step and this machine's peak, for utilisation figures.

Model FLOP utilisation (MFU) = model FLOPs of the steps run (torch's flop counter on one
step, forward and backward; matrix multiplications and convolutions) / wall-clock time /
peak FLOP/s. The CPU peak is cores x FLOPs per cycle x clock: 64 fp32 FLOPs per cycle
per core with AVX-512 (two 16-wide FMA units), 32 with AVX2 + FMA (two 8-wide units, as
on Zen 3), 16 otherwise; the clock is the nominal one the kernel reports. A large fp32
matrix product is measured beside it as a sanity check (it reaches ~80-95 % of a true
peak). Where the kernels are held to a narrower instruction set than the CPU has
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_ENABLE_INSTRUCTIONS=AVX2``:
an AVX-512 host run as an AVX2-only one), the peak is that set's.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from srpu_pipelines.compute.device import cpu_bf16_supported, usable_cores

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


# the environment variables that hold torch's kernels to a narrower instruction set, and
# the widest fp32 FLOPs per cycle per core each value leaves (ATen, oneDNN, MKL)
_ISA_CAPS = (
    ("ATEN_CPU_CAPABILITY", {"default": 16, "avx2": 32}),
    (
        "ONEDNN_MAX_CPU_ISA",
        {"sse41": 16, "avx": 16, "avx2": 32, "avx2_vnni": 32, "avx2_vnni_2": 32},
    ),
    ("MKL_ENABLE_INSTRUCTIONS", {"sse4_2": 16, "avx": 16, "avx2": 32}),
)


def isa_cap(env: dict[str, str] | None = None) -> tuple[int | None, str]:
    """(fp32 FLOPs per cycle per core the kernels are held to, by which variables), or
    (None, "") when none is set to a narrower set than AVX-512."""
    env = os.environ if env is None else env
    caps = [
        (table[env[name].strip().lower()], f"{name}={env[name]}")
        for name, table in _ISA_CAPS
        if env.get(name, "").strip().lower() in table
    ]
    if not caps:
        return None, ""
    return min(c for c, _ in caps), ", ".join(why for _, why in caps)


def cpu_peak(cores: int | None = None) -> dict[str, Any]:
    """The CPU's fp32 peak in GFLOP/s and what it was computed from."""
    info = _cpuinfo()
    m = re.search(r"^flags\s*:\s*(.*)$", info, re.M)
    flags = m.group(1) if m else ""
    per_cycle, isa = fp32_flops_per_cycle(flags)
    cap, why = isa_cap()
    if cap is not None and cap < per_cycle:
        per_cycle, isa = cap, f"{isa}, held to {cap} FLOPs/cycle by {why}"
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
        "native_bf16": cpu_bf16_supported(),
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
