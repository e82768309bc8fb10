"""Checkpoints: a ``state_dict`` file plus a JSON config beside it, never a pickled module.

``NAME.pt`` holds ``{"model": state_dict, ...training state}``; ``NAME.json`` holds what is
needed to rebuild the network (architecture, encoder, classes, input normalisation) and
the scores it was saved with. Both are written atomically; load with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from srpu_pipelines.errors import InputError, MissingError
from srpu_pipelines.io.files import atomic_write_json, atomic_write_with, read_json
from srpu_pipelines.models.factory import create_model, unused_stage_keys

NORMALIZATION = "per_image_zscore"


def model_config(params: Any) -> dict[str, Any]:
    """The JSON config that rebuilds the model of ``params`` (a ``Params``)."""
    m = params.model
    extra = {}
    tp = getattr(params, "train", None)
    nm = getattr(tp, "resample_size", None)
    if nm:
        extra["resample_nm"] = nm  # the pixels it learnt at: inference resamples to them
    up = getattr(tp, "upsample_factor", 1.0)
    if up != 1.0:
        extra["upsample"] = up  # and the enlargement on top: inference enlarges alike
    return {
        "arch": m.arch,
        "encoder": m.encoder,
        "in_channels": m.in_channels,
        "encoder_depth": m.encoder_depth,
        "decoder_channels": list(m.decoder_channels) if m.decoder_channels else None,
        "full_res_skip": m.full_res_skip,
        "num_classes": params.num_classes,
        "class_names": params.class_names,
        "class_colors": [list(c.color) for c in params.classes],
        "normalization": NORMALIZATION,
        **extra,
    }


def save_checkpoint(
    path: str | Path,
    model: nn.Module | dict[str, Any],
    config: dict[str, Any],
    state: dict[str, Any] | None = None,
) -> None:
    """Write ``path`` (.pt: weights + optional training state) and its ``.json`` config.
    ``model`` is a module or its state_dict."""
    path = Path(path)
    weights = model.state_dict() if isinstance(model, nn.Module) else model
    payload = _on_cpu({"model": weights, "config": config, **(state or {})})
    # config first: a run killed between the two writes leaves a .json that fits the
    # .pt to come or, as the .pt also carries its config, one that can be rebuilt
    atomic_write_json(path.with_suffix(".json"), config)
    atomic_write_with(path, lambda tmp: torch.save(payload, tmp))


def _on_cpu(obj: Any) -> Any:
    """Tensors moved to the CPU (containers walked): a checkpoint written on a GPU loads
    anywhere and names no device."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _on_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload, config) of a checkpoint; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"{path}: checkpoint not found; train a model first")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a damaged file
        raise InputError(f"{path}: damaged or not an SRPU checkpoint ({e})") from None
    if not isinstance(payload, dict) or "model" not in payload:
        raise InputError(f"{path}: not an SRPU checkpoint (no 'model' state_dict)")
    if isinstance(payload.get("config"), dict):
        return payload, payload["config"]
    cfg_path = path.with_suffix(".json")
    if not cfg_path.is_file():
        raise MissingError(f"{cfg_path}: checkpoint config missing beside {path.name}")
    return payload, read_json(cfg_path)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    return create_model(
        config["arch"],
        config["encoder"],
        config["num_classes"],
        in_channels=config["in_channels"],
        encoder_depth=config["encoder_depth"],
        decoder_channels=config["decoder_channels"],
        full_res_skip=config.get("full_res_skip", 0),  # 0 in checkpoints written before it
    )


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network from the JSON config and load its weights; eval mode."""
    payload, config = read_checkpoint(path)
    model = build_from_config(config)
    state = payload["model"]
    for k in unused_stage_keys(model, state):
        state.pop(k)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise InputError(f"{path}: weights do not fit the config beside it ({e})") from None
    model.eval()
    return model, config
