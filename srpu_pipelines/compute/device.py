"""Where and how tensors run: the device, the precision, the memory layout, threads and
compilation. Every torch entry point (training, MAE, inference, scoring) resolves its
``device`` and ``precision`` params here, so a GPU workstation and a 2-core laptop run
the same code.

- ``device``: ``auto`` (the first CUDA device when torch sees one, else the CPU), ``cpu``,
  ``cuda`` or ``cuda:N``.
- ``precision``: ``auto`` picks bfloat16 autocast where the hardware runs it natively (a
  CUDA GPU of compute capability >= 8; a CPU with AVX512-BF16 or AMX), else float16 with a
  gradient scaler on older GPUs, else float32 on the CPU. ``bf16``, ``fp16`` and ``fp32``
  force one (``fp16`` only on CUDA).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from srpu_pipelines.errors import UserError

log = logging.getLogger(__name__)
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


class DeviceError(UserError, ValueError):
    """A device or precision that this machine cannot provide (names the params key)."""


def resolve_device(spec: str, key: str = "device") -> torch.device:
    """``auto | cpu | cuda | cuda:N`` -> a torch device that exists here."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if spec == "cpu":
        return torch.device("cpu")
    m = re.fullmatch(r"cuda(?::(\d+))?", spec)
    if not m:
        raise DeviceError(f"{key}: unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    idx = int(m.group(1) or 0)
    if idx >= n:
        raise DeviceError(
            f"{key}: {spec} asked, but torch sees {n} CUDA device(s) here "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device: auto or cpu"
        )
    return torch.device("cuda", idx)


def cpu_has_native_bf16(cpuinfo: str) -> bool:
    """Does a /proc/cpuinfo text list AVX512-BF16 or AMX-BF16?"""
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpuinfo) is not None


@functools.cache
def cpu_bf16_supported() -> bool:
    """True when this CPU runs bfloat16 matmuls natively (AVX512-BF16 / AMX).

    oneDNN also "supports" bfloat16 on plain AVX512 by emulation, and torch's own check
    says yes there; measured on such a Xeon (avx512f/bw/vnni, no avx512_bf16): a training
    step 2.5x slower than fp32. So the CPU flags decide (Linux; elsewhere: fp32)."""
    try:
        native = cpu_has_native_bf16(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return False
    try:
        return native and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def cuda_bf16_supported(device: torch.device) -> bool:
    """Native bfloat16 tensor cores: compute capability 8.0 (Ampere) or newer."""
    return torch.cuda.get_device_capability(device)[0] >= 8


@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None = float32) on a device type, and whether gradients need a
    scaler (float16 only: its range is too small for small gradients)."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that does nothing unless float16 needs it."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def resolve_precision(precision: str, device: torch.device, key: str = "precision") -> Precision:
    """``auto | bf16 | fp16 | fp32`` on ``device`` -> a :class:`Precision`."""
    if precision not in PRECISIONS:
        raise DeviceError(f"{key}: unknown {precision!r}; valid: {', '.join(PRECISIONS)}")
    kind = device.type
    if precision == "fp32":
        return Precision(kind, None)
    if precision == "bf16":
        return Precision(kind, torch.bfloat16)
    if precision == "fp16":
        if kind != "cuda":
            raise DeviceError(f"{key}: fp16 is for CUDA devices; on the CPU use auto, bf16 or fp32")
        return Precision(kind, torch.float16)
    if kind == "cuda":
        return Precision(kind, torch.bfloat16 if cuda_bf16_supported(device) else torch.float16)
    return Precision(kind, torch.bfloat16 if cpu_bf16_supported() else None)


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int, processes: int = 1) -> int:
    """Intra-op threads: ``threads``, or (0) this process's share of the usable cores
    (``processes`` workers of one run on one machine share them); set only when it
    changes (a new count re-creates the OpenMP pool)."""
    want = threads or max(1, usable_cores() // max(1, processes))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return want


def use_channels_last(setting: str, device: torch.device) -> bool:
    """``auto``: channels-last (NHWC) on both: oneDNN's CPU convolutions and cuDNN's tensor
    cores run fastest on it (measured here: 2.84 -> 2.44 s per step on 2 CPU cores)."""
    return setting in ("auto", "on")


def prepare_module(module: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    module.to(device)
    if channels_last:
        module.to(memory_format=torch.channels_last)
    return module


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """A batch onto the device (asynchronously from pinned memory); 4-D image tensors in
    channels-last layout when the model is."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def compile_wanted(setting: str, device: torch.device) -> bool:
    """``on`` always; ``auto`` on CUDA only (there it pays after a few dozen steps; on a
    2-core CPU the compile itself takes a minute and the measured gain was smaller than
    that within a demo run's budget, see the README's speed table); ``off`` never."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def maybe_compile(module: nn.Module, setting: str, device: torch.device) -> nn.Module:
    if not compile_wanted(setting, device):
        return module
    log.info("torch.compile on %s (the first steps include compiling)", device)
    return torch.compile(module, dynamic=False)


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timings on CUDA are otherwise only launch times)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Runtime:
    """A resolved place to run: device, autocast precision and memory layout."""

    device: torch.device
    precision: Precision
    channels_last: bool = False

    @classmethod
    def cpu(cls) -> Runtime:
        return cls(torch.device("cpu"), Precision("cpu", None), False)

    def describe(self) -> str:
        layout = ", channels-last" if self.channels_last else ""
        return f"{self.device} {self.precision.name}{layout}"


def resolve_runtime(
    device: str, precision: str, channels_last: str = "auto", section: str = ""
) -> Runtime:
    """The :class:`Runtime` of a params section's ``device``/``precision``/``channels_last``
    (``section`` names the params section in errors, e.g. ``train``)."""
    pre = f"{section}." if section else ""
    dev = resolve_device(device, f"{pre}device")
    return Runtime(
        dev,
        resolve_precision(precision, dev, f"{pre}precision"),
        use_channels_last(channels_last, dev),
    )


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for one without)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")
