"""Masked-image modelling (MAE) around the segmentation model's own encoder.

Both paths pretrain the very encoder module the segmentation model uses, so its weights
load back 1:1 (every encoder tensor, checked by name and shape).

- ``vit`` (true MAE, He et al. 2022): a timm ViT encoder (smp ``tu-vit_*``, used by the
  DPT architecture) sees only the visible patches; a light transformer decoder fills in
  mask tokens and predicts the pixels of the masked patches.
- ``cnn`` (SparK / ConvNeXt-V2 FCMAE spirit): a convolution cannot drop patches, so masked
  patches are zeroed at the input and re-zeroed after every convolution and normalisation
  layer (forward hooks), which is how SparK emulates sparse convolution on dense tensors:
  nothing of a masked patch's content ever reaches the encoder. A light convolutional
  decoder fills masked cells of the deepest feature map with a mask token and predicts
  pixels through a pixel shuffle.

In both, the loss is the mean squared error on masked patches only, against targets
normalised per patch (``norm_pix_loss``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from srpu_pipelines.errors import InputError

METHODS = ("cnn", "vit")


def random_patch_mask(
    n: int, gh: int, gw: int, ratio: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(n, gh, gw) bool, True = masked: exactly ``round(ratio * gh * gw)`` patches per image
    (at least 1, at most all but one), at random positions."""
    total = gh * gw
    k = n_masked(ratio, gh, gw)
    noise = torch.rand(n, total, generator=generator)
    order = noise.argsort(dim=1)
    mask = torch.zeros(n, total, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.view(n, gh, gw)


def patchify(img: torch.Tensor, p: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, p*p*C), patches in row-major order."""
    n, c, h, w = img.shape
    x = img.reshape(n, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // p) * (w // p), p * p * c)


def unpatchify(x: torch.Tensor, p: int, c: int, gh: int, gw: int) -> torch.Tensor:
    """(N, gh*gw, p*p*C) -> (N, C, gh*p, gw*p)."""
    n = x.shape[0]
    x = x.reshape(n, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, c, gh * p, gw * p)


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch: int, norm_pix: bool
) -> torch.Tensor:
    """Mean squared error over the masked patches only.

    pred, target (N, C, H, W); mask (N, H/patch, W/patch) bool, True = masked. With
    ``norm_pix`` each target patch is normalised to zero mean and unit variance first.
    """
    pp, tp = patchify(pred.float(), patch), patchify(target.float(), patch)
    if norm_pix:
        mu = tp.mean(-1, keepdim=True)
        var = tp.var(-1, keepdim=True)
        tp = (tp - mu) / (var + 1e-6).sqrt()
    per_patch = ((pp - tp) ** 2).mean(-1)  # (N, L)
    m = mask.reshape(mask.shape[0], -1).to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def upsample_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, gh, gw) bool -> (N, 1, H, W) float, 1 = visible, by nearest neighbour."""
    vis = (~mask).unsqueeze(1).float()
    return F.interpolate(vis, size=size, mode="nearest")


class CnnMae(nn.Module):
    """SparK-style masked modelling of a CNN encoder (an smp encoder returning a list of
    feature maps, the deepest at stride ``2**depth``)."""

    def __init__(
        self, encoder: nn.Module, in_channels: int, stride: int, dim: int, depth: int
    ) -> None:
        super().__init__()
        self.encoder, self.in_channels, self.stride = encoder, in_channels, stride
        self._visible: torch.Tensor | None = None
        self._hooks = [
            m.register_forward_hook(self._remask)
            for m in encoder.modules()
            if isinstance(m, (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm))
            or type(m).__name__ == "LayerNorm2d"  # timm ConvNeXt: channels-first LayerNorm
        ]
        if not self._hooks:
            raise InputError("cnn MAE: the encoder has no Conv2d layer; use pretrain.method: vit")
        deep = int(encoder.out_channels[-1])
        self.proj = nn.Conv2d(deep, dim, 1)
        self.mask_token = nn.Parameter(torch.zeros(1, dim, 1, 1))
        nn.init.normal_(self.mask_token, std=0.02)
        blocks: list[nn.Module] = []
        for _ in range(depth):
            blocks += [nn.Conv2d(dim, dim, 3, padding=1), nn.GroupNorm(1, dim), nn.GELU()]
        self.decoder = nn.Sequential(*blocks)
        self.head = nn.Conv2d(dim, stride * stride * in_channels, 1)

    def _remask(self, _m: nn.Module, _inp: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if self._visible is None or not torch.is_tensor(out) or out.ndim != 4:
            return None
        v = self._visible
        if v.shape[-2:] != out.shape[-2:]:
            v = F.interpolate(v, size=out.shape[-2:], mode="nearest")
        return out * v.to(out.dtype)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Deepest feature map of the masked input; masked cells hold no image content."""
        self._visible = upsample_mask(mask, x.shape[-2:])
        try:
            feats = self.encoder(x.expand(-1, self.in_channels, -1, -1) * self._visible)
        finally:
            self._visible = None
        return feats[-1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, 1, H, W) standardised; mask (N, H/p, W/p) bool -> reconstruction
        (N, in_channels, H, W)."""
        f = self.proj(self.encode(x, mask))
        vis = upsample_mask(mask, f.shape[-2:]).to(f.dtype)
        f = f * vis + self.mask_token.to(f.dtype) * (1 - vis)
        return F.pixel_shuffle(self.head(self.decoder(f)), self.stride)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def recalibrate_bn(self, batches: list[torch.Tensor]) -> None:
        """Re-estimate the encoder's BatchNorm running statistics on unmasked tiles.

        During pretraining they were averaged over inputs with a share ``mask_ratio`` of
        zeros; fine-tuning (and a frozen encoder) sees whole images.
        """
        bns = [m for m in self.encoder.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not bns or not batches:
            return
        was = self.encoder.training
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        self.encoder.train()
        for x in batches:
            self.encoder(x.expand(-1, self.in_channels, -1, -1))
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        self.encoder.train(was)


def _sincos_2d(gh: int, gw: int, dim: int) -> torch.Tensor:
    """(1, gh*gw, dim) fixed 2-D sine-cosine position embedding (MAE's decoder)."""
    if dim % 4:
        raise InputError(f"pretrain.decoder_dim must be a multiple of 4 for vit, got {dim}")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float32) / q))
    ys, xs = torch.meshgrid(
        torch.arange(gh, dtype=torch.float32), torch.arange(gw, dtype=torch.float32), indexing="ij"
    )
    out = []
    for pos in (ys.reshape(-1), xs.reshape(-1)):
        a = pos[:, None] * omega[None]
        out += [a.sin(), a.cos()]
    return torch.cat(out, 1)[None]


class VitMae(nn.Module):
    """True MAE on a timm VisionTransformer: masked patch tokens are dropped before the
    encoder blocks; the decoder sees encoded visible tokens plus mask tokens."""

    def __init__(self, vit: nn.Module, in_channels: int, dim: int, depth: int) -> None:
        super().__init__()
        from timm.models.vision_transformer import Block

        self.vit, self.in_channels = vit, in_channels
        self.token = int(vit.patch_embed.patch_size[0])
        self.prefix = int(vit.num_prefix_tokens)
        self.embed = nn.Linear(vit.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mask_token, std=0.02)
        heads = max(1, dim // 32)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, self.token * self.token * in_channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (N, 1, H, W); mask (N, H/p, W/p) bool at the masking patch p (a multiple of
        the ViT patch) -> reconstruction (N, in_channels, H, W)."""
        n, _, h, w = x.shape
        gh, gw = h // self.token, w // self.token
        tok_mask = F.interpolate(mask[:, None].float(), size=(gh, gw), mode="nearest")
        tok_mask = tok_mask.reshape(n, -1).bool()  # (N, L), the same count in every image
        t = self.vit.patch_embed(x.expand(-1, self.in_channels, -1, -1))
        t = self.vit._pos_embed(t)  # prefix tokens + patches, position embedding added
        t = self.vit.norm_pre(self.vit.patch_drop(t))
        prefix, patches = t[:, : self.prefix], t[:, self.prefix :]
        keep = (~tok_mask).nonzero(as_tuple=False)[:, 1].view(n, -1)  # visible indices
        vis = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        z = self.vit.norm(self.vit.blocks(torch.cat([prefix, vis], 1)))
        z = self.embed(z[:, self.prefix :])
        full = self.mask_token.to(z.dtype).expand(n, gh * gw, -1).clone()
        full.scatter_(1, keep[..., None].expand(-1, -1, z.shape[-1]), z)
        full = full + _sincos_2d(gh, gw, full.shape[-1]).to(full)
        for blk in self.blocks:
            full = blk(full)
        pix = self.head(self.norm(full))
        return unpatchify(pix, self.token, self.in_channels, gh, gw)


def encoder_unit(model: nn.Module, method: str) -> int:
    """Smallest masking patch the encoder allows: the stride of its deepest feature map
    (cnn; 16 for dilated DeepLab encoders, else 2**depth) or its patch size (vit)."""
    if method == "vit":
        return int(model.encoder.model.patch_embed.patch_size[0])
    enc = model.encoder
    return int(getattr(enc, "output_stride", 2 ** int(enc._depth)))


def resolve_method(method: str, encoder_name: str) -> str:
    """``auto`` -> ``vit`` for ViT encoders (``tu-vit_*``, ``tu-deit_*`` ...), else ``cnn``."""
    if method != "auto":
        return method
    from srpu_pipelines.models.factory import is_vit_encoder

    return "vit" if is_vit_encoder(encoder_name) else "cnn"


def build_mae(
    model: nn.Module, method: str, in_channels: int, patch: int, dim: int, depth: int
) -> nn.Module:
    """The MAE wrapper around ``model.encoder`` (the segmentation model's own encoder).

    ``patch`` (the masking unit) must be a multiple of :func:`encoder_unit`.
    """
    if method not in METHODS:
        raise InputError(f"pretrain.method: unknown {method!r}; valid: auto, {', '.join(METHODS)}")
    if method == "vit" and not hasattr(getattr(model.encoder, "model", None), "patch_embed"):
        raise InputError(
            "pretrain.method: vit needs a ViT encoder (e.g. model.arch: dpt with "
            "model.encoder: tu-vit_tiny_patch16_224); use cnn for CNN encoders"
        )
    unit = encoder_unit(model, method)
    if patch % unit:
        raise InputError(
            f"pretrain.patch_size: {patch} must be a multiple of {unit} (the encoder's "
            f"{'patch size' if method == 'vit' else 'total stride 2**encoder_depth'})"
        )
    if method == "vit":
        return VitMae(model.encoder.model, in_channels, dim, depth)
    return CnnMae(model.encoder, in_channels, unit, dim, depth)


def n_masked(ratio: float, gh: int, gw: int) -> int:
    """How many patches :func:`random_patch_mask` masks per image."""
    return min(max(int(round(ratio * gh * gw)), 1), gh * gw - 1)
