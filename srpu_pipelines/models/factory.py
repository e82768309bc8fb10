"""Segmentation models: a registry of smp architectures and one ``create_model`` factory.

Encoders are smp's own names (``resnet18``, ``efficientnet-b0`` ...) or any timm model as
``tu-<name>``. Weights start random (nothing can be downloaded here) or from a local file.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from segmentation_models_pytorch.base.modules import Conv2dReLU
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder, UnetDecoderBlock
from torch import nn

from srpu_pipelines.errors import InputError, MissingError, UnknownNameError

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "manet": smp.MAnet,
    "linknet": smp.Linknet,
    "dpt": smp.DPT,  # ViT encoders (tu-vit_*), any input size
}
_DECODER_CHANNELS_ARCHS = {"unet", "unetplusplus", "manet"}
# FPN and DeepLabV3+ build their decoder for 5 encoder stages (other depths give wrong sizes).
_DEPTH_ARCHS = {"unet", "unetplusplus", "manet", "linknet"}


def is_vit_encoder(name: str) -> bool:
    """ViT-family timm encoders (``tu-vit_*``, ``tu-deit*`` ...): the DPT architecture's."""
    return name.removeprefix("tu-").startswith(("vit_", "deit", "eva", "beit"))


@functools.cache
def encoder_names() -> tuple[str, ...]:
    """smp encoder names plus ``tu-`` timm names."""
    import timm

    return tuple(sorted(smp.encoders.get_encoder_names())) + tuple(
        f"tu-{n}" for n in timm.list_models()
    )


def _check_encoder(name: str) -> None:
    if name in encoder_names():
        return
    smp_names = [n for n in encoder_names() if not n.startswith("tu-")]
    raise UnknownNameError(
        f"model.encoder: unknown encoder {name!r}. smp encoders: {', '.join(smp_names)}; "
        "or any timm model as 'tu-<name>' (e.g. tu-resnet18, tu-convnext_atto)"
    )


def create_model(
    arch: str,
    encoder: str,
    num_classes: int,
    in_channels: int = 1,
    encoder_depth: int = 5,
    decoder_channels: list[int] | tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    full_res_skip: int = 0,
) -> nn.Module:
    """Build ``arch`` on ``encoder`` with random init, or load ``weights`` (a local file).

    Input (N, in_channels, H, W) with H, W multiples of 2**encoder_depth; output logits
    (N, num_classes, H, W). ``full_res_skip`` > 0 (unet only): a conv of that many channels
    on the encoder's full-resolution output (the input, for ResNets) joins the last decoder
    block as its skip (see ``FullResSkipDecoder``).
    """
    if arch not in ARCHITECTURES:
        raise UnknownNameError(
            f"model.arch: unknown architecture {arch!r}; valid: {', '.join(sorted(ARCHITECTURES))}"
        )
    _check_encoder(encoder)
    kw: dict[str, Any] = dict(
        encoder_name=encoder,
        encoder_weights=None,
        in_channels=in_channels,
        classes=num_classes,
        encoder_depth=encoder_depth,
    )
    if arch == "dpt":
        if not is_vit_encoder(encoder):
            raise InputError(
                f"model.encoder: dpt needs a ViT encoder (e.g. tu-vit_tiny_patch16_224), "
                f"got {encoder!r}"
            )
        kw["dynamic_img_size"] = True  # timm ViT at any multiple of its patch size
        if encoder_depth != 4:
            raise InputError("model.encoder_depth: dpt needs 4 (ViT blocks it reads out)")
    elif encoder_depth != 5 and arch not in _DEPTH_ARCHS:
        raise InputError(
            f"model.encoder_depth: {arch!r} needs 5; other depths work with {sorted(_DEPTH_ARCHS)}"
        )
    if decoder_channels is not None:
        if arch not in _DECODER_CHANNELS_ARCHS:
            raise InputError(
                f"model.decoder_channels applies to {sorted(_DECODER_CHANNELS_ARCHS)}, not {arch!r}"
            )
        kw["decoder_channels"] = tuple(decoder_channels)
    elif arch in _DECODER_CHANNELS_ARCHS:
        kw["decoder_channels"] = (256, 128, 64, 32, 16)[:encoder_depth]
    model = ARCHITECTURES[arch](**kw)
    if full_res_skip:
        if arch != "unet":
            raise InputError(f"model.full_res_skip applies to unet, not {arch!r}")
        model.decoder = FullResSkipDecoder(
            model.encoder.out_channels,
            kw["decoder_channels"],
            full_res_skip,
            center=not isinstance(model.decoder.center, nn.Identity),  # smp's, for vgg
        )
    _drop_unused_stages(model.encoder, encoder_depth)
    if weights is not None:
        load_weights(model, weights)
    return model


class FullResSkipDecoder(UnetDecoder):
    """smp's U-Net decoder with a skip at full resolution.

    smp's last decoder block upsamples from half resolution with no skip (it drops the
    input, the encoder's full-resolution "feature"), so edges of objects a few pixels
    across come only from interpolated half-resolution features. Here a 3x3 conv of that
    full-resolution output (``width`` channels, BatchNorm, ReLU) is that block's skip:
    about ``width * (last width + full-resolution channels) * 9`` more multiply-adds
    per pixel.
    """

    def __init__(
        self,
        encoder_channels: Any,
        decoder_channels: Any,
        width: int,
        center: bool = False,
    ) -> None:
        super().__init__(
            encoder_channels,
            decoder_channels,
            n_blocks=len(decoder_channels),
            add_center_block=center,
        )
        last = self.blocks[-1]
        self.blocks[-1] = UnetDecoderBlock(last.conv1[0].in_channels, width, decoder_channels[-1])
        # the encoder's full-resolution output: the input itself (ResNets), 64 maps (VGG)
        self.input_skip = Conv2dReLU(encoder_channels[0], width, kernel_size=3, padding=1)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        shapes = [f.shape[2:] for f in features][::-1]
        deep = features[1:][::-1]
        skips = [*deep[1:], self.input_skip(features[0])]
        x = self.center(deep[0])
        for i, block in enumerate(self.blocks):
            x = block(x, *shapes[i + 1], skip_connection=skips[i])
        return x


# smp's ResNet-style encoders build all five stages whatever the depth; these are the
# stages a shallower encoder never runs (stage 4 = layer3, stage 5 = layer4)
_UNUSED_STAGES = {3: ("layer3", "layer4"), 4: ("layer4",)}


def _drop_unused_stages(encoder: nn.Module, depth: int) -> None:
    """Replace the stages a shallow smp ResNet encoder skips by identities: resnet18 at
    depth 3 has 0.7 M parameters, not 11 M, in memory and in every checkpoint."""
    from segmentation_models_pytorch.encoders.resnet import ResNetEncoder

    if isinstance(encoder, ResNetEncoder):
        for name in _UNUSED_STAGES.get(depth, ()):
            setattr(encoder, name, nn.Identity())


def unused_stage_keys(model: nn.Module, state: dict[str, Any]) -> list[str]:
    """Keys of ``state`` that belong to stages ``model`` dropped (a checkpoint written
    before they were dropped); loading ignores them."""
    have = model.state_dict().keys()
    prefixes = tuple(f"encoder.{n}." for names in _UNUSED_STAGES.values() for n in names)
    return [k for k in state if k not in have and k.startswith(prefixes)]


def load_weights(model: nn.Module, path: str | Path, require: str | None = None) -> dict[str, int]:
    """Load a local state_dict (whole model, or encoder only) into ``model``.

    Accepts an SRPU checkpoint (``{"model": state_dict, ...}``) or a bare state_dict.
    Tensors whose names match ``model`` or ``model.encoder`` load; a file that matches
    nothing, or whose shapes disagree, is an error naming the file. ``require="encoder"``
    (or ``"model"``) also fails unless every encoder (or model) tensor was loaded.
    Returns counts: ``loaded``, ``total`` (model tensors), ``encoder_loaded``,
    ``encoder_total``.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingError(f"model.weights: {path} not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a bad file; name the file
        raise InputError(f"model.weights: {path} is not a loadable state_dict ({e})") from None
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise InputError(f"model.weights: {path} holds no state_dict")
    own = model.state_dict()
    target = (
        own
        if any(k in own for k in state)
        else {f"encoder.{k}": v for k, v in own.items() if k.startswith("encoder.")}
    )
    if target is not own:
        state = {f"encoder.{k}": v for k, v in state.items()}
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise InputError(f"model.weights: no tensor in {path} matches this model/encoder")
    bad = [k for k, v in matched.items() if v.shape != own[k].shape]
    if bad:
        raise InputError(
            f"model.weights: {path}: shape mismatch for {len(bad)} tensors, e.g. {bad[0]} "
            f"{tuple(matched[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
        )
    enc = [k for k in own if k.startswith("encoder.")]
    report = {
        "loaded": len(matched),
        "total": len(own),
        "encoder_loaded": sum(k in matched for k in enc),
        "encoder_total": len(enc),
    }
    need = {"encoder": enc, "model": list(own), None: []}[require]
    missing = [k for k in need if k not in matched]
    if missing:
        raise InputError(
            f"{path}: only {len(need) - len(missing)} of {len(need)} {require} tensors of this "
            f"model are in the file (missing e.g. {missing[0]}); it was saved for another "
            "model.arch/encoder/in_channels/encoder_depth"
        )
    model.load_state_dict(matched, strict=False)
    return report


def model_from_params(p: Any, num_classes: int, weights: str | Path | None = None) -> nn.Module:
    """``create_model`` from a ``ModelParams``; ``weights`` overrides ``p.weights``."""
    if p.encoder == "auto" or p.decoder_channels == "auto":
        raise InputError(
            "model: auto is not planned yet (training/plan.py plan_model picks the encoder "
            "and decoder widths from the data and the budget before a model is built)"
        )
    return create_model(
        p.arch,
        p.encoder,
        num_classes,
        in_channels=p.in_channels,
        encoder_depth=p.encoder_depth,
        decoder_channels=p.decoder_channels,
        weights=weights if weights is not None else p.weights,
        full_res_skip=p.full_res_skip,
    )
