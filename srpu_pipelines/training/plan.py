"""The training plan: keys left ``auto`` set from the data's fingerprint, the budget and
the device, each with the reason for its value.

Every rule is a formula of fingerprint quantities (class pixel shares, object thickness
and extent, image sizes, brightness spread between images), the budget (seconds or
steps) and the device's throughput; none reads a data set's name, path or class names.
An explicit value in params wins over the plan. ``srpu plan`` prints it; every training
run records the plan it used (``plan.json`` beside its checkpoints, MLflow, Dagster).
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from srpu_pipelines.compute.device import resolve_device
from srpu_pipelines.compute.flops import cpu_peak, gpu_peak_tflops
from srpu_pipelines.config import (
    PLANNED_TRAIN_KEYS,
    AugmentParams,
    LossParams,
    ModelParams,
    StageSetup,
    TrainParams,
)
from srpu_pipelines.data.fingerprint import fingerprint
from srpu_pipelines.data.index import select_items
from srpu_pipelines.io.files import atomic_write_json, read_json

PLAN_VERSION = 2  # bump when a rule changes: saved plans are then made again (a rule for a
# new key needs none: the key itself is among the inputs once it is not null)
# Share of the nominal fp32 peak a whole training run reaches (srpu bench speed, README):
# bfloat16 on CPUs with AMX/AVX512-BF16 0.65-0.9 of it; fp32 with AVX-512 (64 FLOPs/cycle)
# about a third; fp32 with AVX2 (32 FLOPs/cycle, against which the narrow layers and
# BatchNorm are less memory-bound) 0.55 (2026-12-06, AMD EPYC: 52-57 %); a GPU's bf16
# tensor cores about a quarter for these small U-Nets.
CPU_EFFICIENCY = {"bf16": 0.9, "fp32": 0.35, "fp32_avx2": 0.55}
GPU_EFFICIENCY = 0.25
GPU_FALLBACK_TFLOPS = 50.0  # an unknown GPU: a mid-range card's bf16 peak
MIN_STEPS = 300  # optimiser steps a run needs to converge (the tile shrinks to reach it)
EMA_HORIZON = 0.05  # the weight average's time constant, a share of the planned steps
VAL_SHARE = 0.1  # share of the training time validation may take
THIN_PX = 8.0  # a class thinner than this (px) is thin: no blur, full resolution
# enlargement for thin classes where the time budget affords it (nasa-super, 1000 steps,
# tile 448 at 2x vs 224: val mIoU 0.902 vs 0.892, tertiary 0.791 vs 0.778; README)
UPSAMPLE = 2.0
ENLARGED_TILE_CAP = 1024  # a planned tile grows with the enlargement up to this (8 tiles of
# 1024 px are ~8 M pixels a step: a GPU's memory)
SKELETON_WEIGHT = 0.0  # skeleton recall for line-like classes: off, it lost on nasa-ebc (README)
ELONGATED = 4.0  # length / thickness from which a fine class is line-like
ANISOTROPIC = 0.5  # boundary coherence above which 90-degree turns are off
RESAMPLE_SPREAD = 1.25  # pixel sizes within this ratio of each other: trained as they are
RARE_CROP_TARGET = 0.3  # share of crops centred on the rare classes (together)
# model: auto picks the largest rung a time budget trains for MODEL_MIN_STEPS steps (a
# step budget alone: the smallest). Measured on this CPU at 600 s (README):
# nasa-super, light decoder 1158 steps val mIoU 0.890, smp's standard decoder 830 steps
# 0.890: level, so the cheaper one; the light rung plans ~1000 steps there
MODEL_LADDER = (
    ("light", "resnet18", (128, 64, 32, 16, 16)),
    ("standard", "resnet18", (256, 128, 64, 32, 16)),
    ("large", "resnet34", (256, 128, 64, 32, 16)),
)
MODEL_MIN_STEPS = 1000
# tile bounds per device: on a CPU, tiles above 256 px cost more steps than their context
# gives (nasa-ebc, 600 s: 384 px 513 steps val mIoU 0.763, 256 px 843 steps 0.780; README)
TILE_MIN, TILE_CAP = {"cpu": 128, "cuda": 256}, {"cpu": 256, "cuda": 1024}


@dataclass
class Device:
    """What the plan knows of where a run goes: its kind and effective GFLOP/s."""

    kind: str  # cpu | cuda
    name: str
    gflops: float
    how: str

    @classmethod
    def of(cls, spec: str, precision: str = "auto") -> Device:
        dev = resolve_device(spec)
        if dev.type == "cuda":
            name = torch.cuda.get_device_name(dev)
            peak = gpu_peak_tflops(name) or GPU_FALLBACK_TFLOPS
            return cls(
                "cuda",
                name,
                peak * 1e3 * GPU_EFFICIENCY,
                f"{GPU_EFFICIENCY:.0%} of {peak:g} TFLOP/s bf16",
            )
        cpu = cpu_peak()
        bf16 = cpu["native_bf16"] and precision in ("auto", "bf16")
        narrow = cpu["flops_per_cycle_per_core"] <= 32
        eff = CPU_EFFICIENCY["bf16" if bf16 else "fp32_avx2" if narrow else "fp32"]
        return cls(
            "cpu",
            f"{cpu['cores']} cores of {cpu['cpu']}",
            cpu["fp32_peak_gflops"] * eff,
            f"{eff:.0%} of the {cpu['fp32_peak_gflops']:g} GFLOP/s fp32 peak "
            f"({'bf16' if bf16 else 'fp32'})",
        )


@dataclass
class Plan:
    """The values chosen for ``auto`` keys and why, plus the estimates they rest on."""

    values: dict[str, Any] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    estimates: dict[str, Any] = field(default_factory=dict)

    def set(self, key: str, value: Any, reason: str) -> None:
        self.values[key], self.reasons[key] = value, reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "values": self.values,
            "reasons": self.reasons,
            "estimates": self.estimates,
        }


@lru_cache(maxsize=16)
def train_flops_per_pixel(model_json: str, num_classes: int) -> float:
    """Model FLOPs of one training step per input pixel (forward x 3 for the backward),
    counted by torch's flop counter on the meta device (no memory, no compute)."""
    from torch.utils.flop_counter import FlopCounterMode

    from srpu_pipelines.config import ModelParams
    from srpu_pipelines.models.factory import model_from_params

    mp = ModelParams.model_validate({**json.loads(model_json), "weights": None})
    with torch.device("meta"):
        model = model_from_params(mp, num_classes)
    x = torch.zeros(1, mp.in_channels, 64, 64, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x)
    return 3.0 * counter.get_total_flops() / (64 * 64)


def _classes(fp: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """(the dominant class, the others present, the fine ones among them: thinner than
    THIN_PX, which a blur would wipe out)."""
    cls = {k: v for k, v in fp["classes"].items() if v["share"] > 0}
    dominant = max(cls, key=lambda k: cls[k]["share"])
    others = [k for k in cls if k != dominant]
    fine = [k for k in others if cls[k]["thickness"] < THIN_PX]
    return dominant, others, fine


def _thin(fp: dict[str, Any]) -> list[str]:
    """Fine classes that are also line-like (cracks, grain boundaries): their pixels are
    few, their length is what matters."""
    _, _, fine = _classes(fp)
    return [k for k in fine if fp["classes"][k]["elongation"] >= ELONGATED]


def _round32(x: float) -> int:
    return max(32, int(math.ceil(x / 32.0)) * 32)


def _steps(setup: StageSetup, dev: Device, fpp: float, tile: int, batch: int) -> int:
    """Optimiser steps the budget allows at this tile and batch (the step budget caps)."""
    tp = setup.train
    if tp.budget_s is None:
        return tp.total_steps
    step_s = fpp * batch * tile * tile / (dev.gflops * 1e9)
    return int(min(tp.total_steps, tp.budget_s / (1 + VAL_SHARE) / step_s))


def _batch(plan: Plan, dev: Device, tile_guess: int) -> int:
    if dev.kind == "cpu":
        plan.set(
            "batch_size",
            8,
            "CPU: 8 tiles keep the cores' matrix units busy; more "
            "would cost steps, which a small labelled set needs more",
        )
        return 8
    b = int(min(64, max(8, 2 ** round(math.log2((1 << 21) / tile_guess**2)))))
    plan.set("batch_size", b, f"GPU: about 2 M pixels a step at tile {tile_guess}")
    return b


def _context(fp: dict, dev: Device) -> tuple[int, int, int, float, int]:
    """(the tile the structures want, the device's smallest and largest tile, the largest
    structures' extent, the smallest image side)."""
    _, others, _ = _classes(fp)
    context = max((fp["classes"][k]["extent"] for k in others), default=128.0)
    side = min(fp["height"]["min"], fp["width"]["min"])
    lo, cap = TILE_MIN[dev.kind], min(TILE_CAP[dev.kind], max(32, side // 32 * 32))
    return min(_round32(1.5 * context), cap), lo, cap, context, side


def _tile(plan: Plan, setup: StageSetup, fp: dict, dev: Device, fpp: float, batch: int) -> int:
    want, lo, cap, context, side = _context(fp, dev)
    tile = max(min(lo, cap), want)
    need = min(MIN_STEPS, setup.train.total_steps)  # a step budget: steps do not depend on it
    while tile > min(lo, cap) and _steps(setup, dev, fpp, tile, batch) < need:
        tile -= 32
    est = _steps(setup, dev, fpp, tile, batch)
    why = (
        f"1.5 x the largest structures' extent ({context:.0f} px, area-weighted) = "
        f"{_round32(1.5 * context)}, within {min(lo, cap)}..{cap} (device, smallest image "
        f"side {side})"
    )
    if tile < want:
        why += f"; lowered to {tile} so that the budget still gives >= {need} steps"
    plan.set("tile_size", tile, why + f" (about {est} steps)")
    return tile


def _model_steps(tp: TrainParams, dev: Device, fpp: float, tile: int, batch: int) -> int:
    step_s = fpp * batch * tile * tile / (dev.gflops * 1e9)
    return int(min(tp.total_steps, tp.budget_s / (1 + VAL_SHARE) / step_s))


def choose_model(
    model: ModelParams, tp: TrainParams, fp: dict[str, Any], dev: Device, num_classes: int
) -> tuple[ModelParams, str, dict[str, Any]]:
    """The largest rung of MODEL_LADDER (its explicit fields kept) that the budget still
    trains for MODEL_MIN_STEPS steps at the tile the structures want; the smallest when
    none does, or when there is no time budget (the steps are then fixed, not the time).
    Returns (model, why, steps per rung)."""
    rungs: list[tuple[str, ModelParams]] = []
    for name, enc, dec in MODEL_LADDER:
        m = model.model_copy(
            update={
                "encoder": enc if model.encoder == "auto" else model.encoder,
                "decoder_channels": list(dec[: model.encoder_depth])
                if model.decoder_channels == "auto"
                else model.decoder_channels,
            }
        )
        if all(m != r for _, r in rungs):
            rungs.append((name, m))
    want, lo, cap, _, _ = _context(fp, dev)
    tile = tp.tile_size if tp.tile_size != "auto" else max(min(lo, cap), want)
    batch = tp.batch_size if tp.batch_size != "auto" else _batch(Plan(), dev, tile)
    if tp.budget_s is None:
        name, chosen = rungs[0]
        why = (
            f"{name}: {chosen.encoder}, decoder {chosen.decoder_channels}; a step budget "
            f"alone ({tp.total_steps} steps) fixes the steps, not the time, so the smallest "
            "rung (train.budget_s lets the plan weigh a larger model against its steps)"
        )
        return chosen, why, {"model_tile": tile}
    steps = {
        name: _model_steps(
            tp, dev, train_flops_per_pixel(m.model_dump_json(), num_classes), tile, batch
        )
        for name, m in rungs
    }
    need = min(MODEL_MIN_STEPS, tp.total_steps)
    fits = [(n, m) for n, m in rungs if steps[n] >= need]
    name, chosen = fits[-1] if fits else rungs[0]
    why = (
        f"{name}: {chosen.encoder}, decoder {chosen.decoder_channels}; the largest of "
        + ", ".join(f"{n} ~{steps[n]}" for n, _ in rungs)
        + f" steps (tile {tile}, batch {batch}, {tp.budget_s:g} s on {dev.kind}) that still trains "
        f">= {need} steps" + ("" if fits else ": none does, so the smallest")
    )
    return chosen, why, {"model_steps": steps, "model_tile": tile}


def _fingerprint(
    index: dict[str, Any], class_names: list[str], splits: list[str], datasets: list[str] | None
) -> dict[str, Any]:
    items = select_items(index, splits, datasets)
    return fingerprint(items, class_names, index.get("pixel_size_nm"))


def plan_model(
    model: ModelParams,
    tp: TrainParams,
    class_names: list[str],
    index: dict[str, Any],
    save: bool = True,
    fp: dict[str, Any] | None = None,
    dev: Device | None = None,
) -> tuple[ModelParams, dict[str, Any] | None]:
    """``model`` with its ``auto`` sizes chosen from the top-level train section ``tp``
    (one model for every stage and the MAE encoder that initialises them); (model, None)
    when nothing is auto. The choice is kept in ``tp.out_dir/model_plan.json`` and reused
    while its inputs match, so a stage, a resumed run and the MAE step agree even where the
    measured CPU clock moves between them. ``fp`` and ``dev``, when the caller has them,
    must be the fingerprint of ``tp``'s splits and datasets and ``tp``'s device."""
    if not model.is_auto:
        return model, None
    if fp is None:
        fp = _fingerprint(index, class_names, tp.splits, tp.datasets)
    if dev is None:
        dev = Device.of(tp.device, tp.precision)
    budget = {k: getattr(tp, k) for k in ("budget_s", "total_steps", "tile_size", "batch_size")}
    inputs = {
        "fingerprint": fp["mask_sha256"],
        "model": model.model_dump(mode="json"),
        "budget": budget,
        "data": [tp.splits, tp.datasets],
        "device": [dev.kind, dev.name],
        "version": PLAN_VERSION,
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    path = Path(tp.out_dir) / "model_plan.json"
    saved = read_json(path) if path.is_file() else None
    if not (isinstance(saved, dict) and saved.get("inputs_sha256") == key):
        chosen, why, est = choose_model(model, tp, fp, dev, len(class_names))
        saved = {
            "value": chosen.model_dump(mode="json"),
            "why": why,
            "estimates": est,
            "inputs_sha256": key,
        }
        if save:
            atomic_write_json(path, saved)
    return ModelParams.model_validate(saved["value"]), saved


def _class_weights(plan: Plan, fp: dict, names: list[str]) -> list[float]:
    shares = [fp["classes"][n]["share"] for n in names]
    top = max(shares)
    w = [round(min(10.0, max(1.0, math.sqrt(top / s))), 2) if s > 0 else 1.0 for s in shares]
    plan.set(
        "loss.class_weights",
        w,
        "sqrt(largest class share / class share), within 1..10: shares "
        + ", ".join(f"{s:.4f}" for s in shares),
    )
    return w


def _loss(plan: Plan, setup: StageSetup, fp: dict) -> LossParams:
    base = setup.train.loss
    if isinstance(base, LossParams) and base.class_weights != "auto":
        return base
    w = _class_weights(plan, fp, setup.class_names)
    if isinstance(base, LossParams):
        return base.model_copy(update={"class_weights": w})
    thin = _thin(fp)
    loss = LossParams(
        ce_weight=1.0,
        dice_weight=1.0,
        class_weights=w,
        skeleton_weight=SKELETON_WEIGHT if thin else 0.0,
        skeleton_classes=thin if SKELETON_WEIGHT else [],
    )
    why = (
        "cross-entropy (class-weighted) for every pixel + soft Dice, which weighs each class "
        "equally whatever its share"
    )
    if thin and SKELETON_WEIGHT:
        th = ", ".join(
            f"{k} {fp['classes'][k]['thickness']:.1f} px thick, elongation "
            f"{fp['classes'][k]['elongation']:.0f}"
            for k in thin
        )
        why += (
            f"; + skeleton recall for the line-like classes ({th}: under {THIN_PX:g} px, "
            f"elongation >= {ELONGATED:g})"
        )
    plan.set("loss", loss.model_dump(mode="json"), why)
    return loss


def _rare_crop(plan: Plan, fp: dict, rare_share: float) -> float:
    present = [k for k, v in fp["classes"].items() if v["share"] > 0]
    rare = [k for k in present if fp["classes"][k]["share"] < rare_share]
    if not rare:
        p = 0.25
        why = (
            f"no class under {rare_share:.0%} of the pixels: a quarter of crops centred on "
            "a drawn class"
        )
    else:
        p = round(min(0.95, max(0.25, RARE_CROP_TARGET * len(present) / len(rare))), 2)
        why = (
            f"{len(rare)} of {len(present)} classes under {rare_share:.0%} of the pixels: "
            f"{RARE_CROP_TARGET:.0%} of crops centred on them (the centre class is drawn "
            f"uniformly, so {RARE_CROP_TARGET:g} x {len(present)} / {len(rare)})"
        )
    plan.set("rare_crop_prob", p, why)
    return p


def _augment(plan: Plan, fp: dict) -> AugmentParams:
    _, others, thin = _classes(fp)
    aniso = max((fp["classes"][k]["anisotropy"] for k in others), default=0.0)
    aug = AugmentParams(
        flips=True,
        rotate90=aniso < ANISOTROPIC,
        brightness_contrast=0.2,
        gamma=0.2,
        noise=0.03,
        blur=0.0 if thin else 0.2,
    )
    why = [
        "flips always (a micrograph has no handedness)",
        f"90-degree turns {'on' if aug.rotate90 else 'off'} (boundary anisotropy "
        f"{aniso:.2f}; off from {ANISOTROPIC:g}, where structures share one direction)",
        "brightness/contrast 0.2 and gamma 0.2 (the input is standardised per image, which "
        "removes linear brightness and contrast differences between images)",
        "blur " + (f"off: {', '.join(thin)} thinner than {THIN_PX:g} px" if thin else "0.2"),
    ]
    plan.set("augment", aug.model_dump(mode="json"), "; ".join(why))
    return aug


def _pixel_sizes(fp: dict[str, Any]) -> tuple[dict[str, float], float, float]:
    """(known pixel size per sub-dataset, the finest and coarsest image's pixel size: the
    sub-datasets' ranges where their images carry their own calibration)."""
    known: dict[str, float] = {}
    lo, hi = math.inf, 0.0
    for d, v in fp.get("datasets", {}).items():
        if v.get("pixel_size_nm"):
            known[d] = float(v["pixel_size_nm"])
            r = v.get("pixel_size_range_nm") or [known[d], known[d]]
            lo, hi = min(lo, float(r[0])), max(hi, float(r[1]))
    return known, lo, hi


def _thin_at(fp: dict[str, Any], target: float) -> list[str]:
    """Classes (other than the dominant one) that would be under THIN_PX px thick at
    ``target`` nm pixels in some sub-dataset of known pixel size (its thickness in nm over
    the target)."""
    dominant, _, _ = _classes(fp)
    out: set[str] = set()
    for v in fp.get("datasets", {}).values():
        nm = v.get("pixel_size_nm")
        for k, c in (v.get("classes") or {}).items():
            if nm and k != dominant and c.get("share", 0) > 0 and c.get("thickness"):
                if c["thickness"] * nm / target < THIN_PX:
                    out.add(k)
    return sorted(out)


def resample_target(fp: dict[str, Any]) -> tuple[float | None, str]:
    """(pixel size in nm to train at, or None for the images' own pixels; why).

    Pixel sizes that differ by more than RESAMPLE_SPREAD between images send one structure
    to the network at several scales: the images are resampled to one size, the median of
    the sub-datasets' sizes (each image moves least), or the finest where a class is thin
    (under THIN_PX px in the images as they are, or at the median in some sub-dataset,
    from its thickness in nm), which only ever enlarges: a thin phase is never
    downsampled."""
    _, _, fine = _classes(fp)
    known, lo, hi = _pixel_sizes(fp)
    if not known:
        return None, (
            "the images' own pixels: pixel sizes unknown (no calibration tag or sidecar "
            "file; data.datasets[].pixel_size_nm sets one)"
        )
    listed = ", ".join(f"{d} {s:g} nm" for d, s in sorted(known.items()))
    spread = hi / lo
    if spread <= RESAMPLE_SPREAD:
        return None, (
            f"the images' own pixels: their pixel sizes ({listed}; {lo:g}..{hi:g} nm) are "
            f"within a factor {RESAMPLE_SPREAD:g} of each other"
        )
    why = f"pixel sizes differ by a factor {spread:.2f} ({listed}; {lo:g}..{hi:g} nm): "
    mid = round(float(statistics.median(known.values())), 6)
    thin = sorted(set(fine) | set(_thin_at(fp, mid)))
    if thin and lo < mid:
        return lo, why + (
            f"resampled to the finest, {lo:g} nm, as {', '.join(thin)} "
            f"{'is' if len(thin) == 1 else 'are'} under {THIN_PX:g} px thick (at the "
            f"median {mid:g} nm or as they are) and must never be downsampled"
        )
    return mid, why + f"resampled to the sub-datasets' median, {mid:g} nm (each image moves least)"


def _enlarged(tp: TrainParams, dev: Device, tile: int, batch: int, up: float):
    """(tile, batch, reasons) for images enlarged ``up`` x: a planned tile grows with
    them (the same field of view), up to ENLARGED_TILE_CAP (a GPU's memory); a planned
    GPU batch is planned for that tile. An explicit tile is kept (its field of view
    shrinks)."""
    if tp.tile_size != "auto":
        return tile, batch, {}
    want = _round32(tile * up)
    big = min(want, max(tile, ENLARGED_TILE_CAP))
    why = {
        "tile_size": f"; x {up:g} for the enlargement (same field of view)"
        if big == want
        else f"; x {up:g} for the enlargement, capped at {big}"
    }
    b2 = batch
    if tp.batch_size == "auto":
        probe = Plan()
        b2 = _batch(probe, dev, big)
        if b2 != batch:
            why["batch_size"] = probe.reasons["batch_size"] + " (the enlarged tile)"
    return big, b2, why


def _enlarge(
    plan: Plan, tp: TrainParams, dev: Device, tile: int, batch: int, up: float
) -> tuple[int, int]:
    """The planned tile and batch for images enlarged ``up`` x, and why."""
    big, b2, why = _enlarged(tp, dev, tile, batch, up)
    if "tile_size" in why:
        plan.set("tile_size", big, plan.reasons["tile_size"] + why["tile_size"])
    if "batch_size" in why:
        plan.set("batch_size", b2, why["batch_size"])
    return big, b2


def _upsample(
    plan: Plan, setup: StageSetup, fp: dict, dev: Device, fpp: float, tile: int, batch: int
) -> tuple[float, int, int]:
    """(factor, tile, batch): UPSAMPLE when a class is under THIN_PX px thick and a time
    budget still trains MODEL_MIN_STEPS steps with the planned tile enlarged alike (the
    same field of view, UPSAMPLE^2 the pixels); else 1 and the tile and batch as they
    were. A step budget alone fixes the steps, not the time, so there is nothing to weigh
    the cost against (as for the model ladder): 1."""
    tp = setup.train
    _, _, fine = _classes(fp)
    if not fine:
        plan.set("upsample", 1.0, f"1: no class under {THIN_PX:g} px thick")
        return 1.0, tile, batch
    th = ", ".join(f"{k} {fp['classes'][k]['thickness']:.1f} px" for k in fine)
    if tp.budget_s is None:
        plan.set(
            "upsample",
            1.0,
            f"1: {th} thick (under {THIN_PX:g} px), but a step budget alone "
            f"({tp.total_steps} steps) fixes the steps, not the time: an enlargement would "
            f"cost {UPSAMPLE**2:g}x a step with nothing to weigh it against (train.budget_s "
            "lets the plan weigh it)",
        )
        return 1.0, tile, batch
    big, b2, _ = _enlarged(tp, dev, tile, batch, UPSAMPLE)
    steps = _steps(setup, dev, fpp, big, b2)
    need = min(MODEL_MIN_STEPS, tp.total_steps)
    if steps < need:
        plan.set(
            "upsample",
            1.0,
            f"1: {th} thick (under {THIN_PX:g} px), but {UPSAMPLE:g}x (tile {big}, batch "
            f"{b2}) would leave ~{steps} steps of the {tp.budget_s:g} s, under {need}: at "
            "a short budget more steps at the images' own pixels do as well (README)",
        )
        return 1.0, tile, batch
    kept = "" if tp.tile_size == "auto" else " (train.tile_size kept: a smaller field of view)"
    plan.set(
        "upsample",
        UPSAMPLE,
        f"{UPSAMPLE:g}: {th} thick (under {THIN_PX:g} px): images and masks enlarged "
        f"{UPSAMPLE:g}x so that the network draws them over more pixels; the budget still "
        f"gives ~{steps} steps (>= {need}) at tile {big}, batch {b2}{kept}",
    )
    big, b2 = _enlarge(plan, tp, dev, tile, batch, UPSAMPLE)
    return UPSAMPLE, big, b2


def _resolution(fp: dict[str, Any], target: float | None) -> str:
    """What the plan says of resolution."""
    _, _, fine = _classes(fp)
    known, lo, _ = _pixel_sizes(fp)
    why = f"resampled to {target:g} nm pixels" if target else "native pixels"
    if fine and (not target or not known or target <= lo):
        why += f" (never downsampled: {', '.join(fine)} under {THIN_PX:g} px thick)"
    elif fine:
        why += f" (downsampling the finest images, {lo:g} nm: {', '.join(fine)} may thin out)"
    if not known:
        why += (
            "; pixel sizes unknown (no calibration tag or sidecar file; "
            "data.datasets[].pixel_size_nm sets one)"
        )
    return why


def _val_every(
    plan: Plan, setup: StageSetup, dev: Device, fpp: float, tile: int, batch: int, val_px: int
) -> int:
    """Validate every epoch unless that would cost more than VAL_SHARE of the training
    time: full-size validation images in overlapping windows, forward passes only."""
    tp, inf = setup.train, setup.inference
    windows = 1.0 / (1.0 - inf.overlap) ** 2
    val_s = val_px * windows * fpp / 3.0 / (dev.gflops * 1e9)
    epoch_s = tp.steps_per_epoch * fpp * batch * tile * tile / (dev.gflops * 1e9)
    v = max(1, math.ceil(val_s / (VAL_SHARE * epoch_s))) if val_px else 1
    plan.set(
        "val_every",
        v,
        f"a validation (~{val_s:.1f} s: {val_px / 1e6:.2f} M pixels in windows overlapping "
        f"{inf.overlap:g}) at most {VAL_SHARE:.0%} of the ~{epoch_s:.0f} s of training "
        "between two: the best checkpoint is picked often, at little cost",
    )
    return v


def make_plan(
    setup: StageSetup, fp: dict[str, Any], dev: Device, rare_share: float, val_pixels: int = 0
) -> Plan:
    """The plan for ``setup``'s ``auto`` keys (explicit values are taken as they are)."""
    tp, plan = setup.train, Plan()
    fpp = train_flops_per_pixel(setup.model.model_dump_json(), setup.num_classes)
    plan.estimates.update(
        device=dev.name,
        gflops=round(dev.gflops, 1),
        how=dev.how,
        train_mflop_per_pixel=round(fpp / 1e6, 4),
    )
    guess = tp.tile_size if tp.tile_size != "auto" else 256
    batch = _batch(plan, dev, guess) if tp.batch_size == "auto" else tp.batch_size
    tile = _tile(plan, setup, fp, dev, fpp, batch) if tp.tile_size == "auto" else tp.tile_size
    up = tp.upsample_factor
    if tp.upsample == "auto":
        up, tile, batch = _upsample(plan, setup, fp, dev, fpp, tile, batch)
    elif up != 1.0:  # a factor given (or kept from warm-start weights): the tile follows
        tile, batch = _enlarge(plan, tp, dev, tile, batch, up)
    steps = _steps(setup, dev, fpp, tile, batch)
    plan.estimates["steps"] = steps
    target = tp.resample_size
    if tp.resample_nm == "auto":
        target, why = resample_target(fp)
        plan.set("resample_nm", target, why)
    plan.estimates["resolution"] = _resolution(fp, target) + (
        f"; enlarged {up:g}x" if up != 1.0 else ""
    )
    val_pixels = int(val_pixels * up * up)  # validation sees the images enlarged too
    if tp.lr == "auto":
        lr = round(2e-3 * math.sqrt(batch / 8), 6)
        plan.set("lr", lr, f"AdamW 2e-3 at 8 tiles, x sqrt(batch / 8) for batch {batch}")
    if tp.warmup_steps == "auto":
        w = int(min(500, max(10, round(0.04 * steps))))
        plan.set("warmup_steps", w, f"4 % of the ~{steps} planned steps, within 10..500")
    if tp.val_every == "auto":
        _val_every(plan, setup, dev, fpp, tile, batch, val_pixels)
    if tp.ema == "auto":
        tau = max(10.0, EMA_HORIZON * steps)
        plan.set(
            "ema",
            round(1.0 - 1.0 / tau, 5),
            f"weights averaged over the last ~{tau:.0f} steps ({EMA_HORIZON:.0%} of the "
            f"~{steps} planned): the scored and kept weights move less from step to step",
        )
    if tp.rare_crop_prob == "auto":
        _rare_crop(plan, fp, rare_share)
    loss = _loss(plan, setup, fp)
    if tp.augment == "auto":
        _augment(plan, fp)
    if loss is not tp.loss:
        plan.values["loss"] = loss.model_dump(mode="json")
    return plan


def planned_keys(setup: StageSetup) -> list[str]:
    """The train keys of ``setup`` left ``auto``."""
    tp = setup.train
    out = [k for k in PLANNED_TRAIN_KEYS if "." not in k and getattr(tp, k) == "auto"]
    if isinstance(tp.loss, LossParams) and tp.loss.class_weights == "auto":
        out.append("loss.class_weights")
    return out


def apply_plan(setup: StageSetup, plan: Plan) -> StageSetup:
    """``setup`` with the plan's values in place of its ``auto`` keys."""
    update = {k: v for k, v in plan.values.items() if "." not in k and k != "model"}
    tp = setup.train.model_validate({**setup.train.model_dump(mode="json"), **update})
    return setup.model_copy(update={"train": tp})


def unset_train_keys(tp: TrainParams) -> set[str]:
    """Train keys at the value that means "as before they existed": left out of plan and
    run fingerprints, so plans and runs saved before them still hold."""
    out = set()
    if tp.resample_nm is None:
        out.add("resample_nm")
    if tp.upsample != "auto" and tp.upsample_factor == 1.0:
        out.add("upsample")
    return out


def plan_stage(
    setup: StageSetup,
    index: dict[str, Any],
    saved: dict[str, Any] | None = None,
    save: bool = True,
) -> tuple[StageSetup, Plan | None]:
    """Resolve ``setup``'s ``auto`` keys from the fingerprint of its training images
    (``train.splits``, ``train.datasets``) on its device; (setup, None) when none is auto.

    ``saved`` (a run's ``plan.json``) is taken as it is when it was made from the same
    inputs (fingerprint, settings, model, validation pixels, device): a rerun or a resumed
    run keeps its plan even where the measured clock of the CPU moves between calls."""
    if not planned_keys(setup) and not setup.model.is_auto:
        return setup, None
    tp = setup.train
    fp = _fingerprint(index, setup.class_names, tp.splits, tp.datasets)
    dev = Device.of(tp.device, tp.precision)
    mplan = None
    if setup.model.is_auto:
        mtp = setup.model_train or tp
        same_data = (mtp.splits, mtp.datasets) == (tp.splits, tp.datasets)
        same_dev = (mtp.device, mtp.precision) == (tp.device, tp.precision)
        mp, mplan = plan_model(
            setup.model,
            mtp,
            setup.class_names,
            index,
            save,
            fp=fp if same_data else None,
            dev=dev if same_dev else None,
        )
        setup = setup.model_copy(update={"model": mp})
    val = select_items(index, [tp.val_split], tp.datasets)
    val_px = sum(it["height"] * it["width"] for it in val)
    off = unset_train_keys(tp)
    inputs = {
        "fingerprint": fp["mask_sha256"],
        # resample_nm left out while null and upsample while 1, so plans saved before the
        # keys existed hold
        "setup": setup.model_dump(mode="json", exclude={"train": off} if off else None),
        "val_pixels": val_px,
        "device": [dev.kind, dev.name],
        "version": PLAN_VERSION,
    }
    if tp.resample_nm == "auto":  # they plan it, and the masks' hash does not see them
        inputs["pixel_sizes"] = _pixel_sizes(fp)
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()
    if saved and saved.get("estimates", {}).get("inputs_sha256") == key:
        plan = Plan(saved["values"], saved["reasons"], saved["estimates"])
    else:
        plan = make_plan(setup, fp, dev, setup.rare_fraction, val_px)
        plan.estimates.update(fingerprint_sha256=fp["mask_sha256"], inputs_sha256=key)
    if mplan is not None:
        plan.values = {"model": mplan["value"], **plan.values}
        plan.reasons = {"model": mplan["why"], **plan.reasons}
        plan.estimates.update(mplan["estimates"])
    return apply_plan(setup, plan), plan


def plan_rows(plan: Plan) -> list[tuple[str, Any, str]]:
    """(key, value, reason) per planned key, in plan order."""
    return [(k, plan.values.get(k), plan.reasons[k]) for k in plan.reasons]


def plan_markdown(plan: Plan) -> str:
    """The plan as a markdown table (the Dagster asset's metadata)."""
    rows = ["| key | value | why |", "| --- | --- | --- |"]
    rows += [f"| {k} | `{v}` | {why} |" for k, v, why in plan_rows(plan)]
    est = plan.estimates
    rows.append(
        f"\n{est.get('device')}: ~{est.get('gflops')} GFLOP/s ({est.get('how')}); "
        f"~{est.get('steps')} steps planned"
    )
    return "\n".join(rows)


def plan_document(setups: dict[str, StageSetup], index: dict[str, Any]) -> dict[str, Any]:
    """What ``srpu plan`` prints: the training images' fingerprint and, per stage, each
    planned key with its value and reason, and the estimates behind them."""
    first = next(iter(setups.values()))
    tp = first.train
    items = select_items(index, tp.splits, tp.datasets)
    fp = fingerprint(items, first.class_names, index.get("pixel_size_nm"))
    doc: dict[str, Any] = {"fingerprint": fp, "stages": {}}
    for name, setup in setups.items():
        _, plan = plan_stage(setup, index, save=False)
        if plan is None:
            doc["stages"][name] = "no key is auto: every value is explicit"
            continue
        doc["stages"][name] = {
            "plan": {k: {"value": v, "why": why} for k, v, why in plan_rows(plan)},
            "estimates": plan.estimates,
        }
    return doc
