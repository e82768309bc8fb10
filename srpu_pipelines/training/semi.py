"""Semi-supervised training on unlabelled tiles, FixMatch-style (Sohn et al. 2020).

The model's own softmax on a weakly augmented tile (flips and turns, from
:class:`~srpu_pipelines.data.pool.UnlabeledTiles`) gives a pseudo-label wherever its top
probability reaches ``semi.threshold``; the model is then trained to predict that label
on a strongly augmented copy of the same tile (contrast, brightness, noise, blur and a
cut-out square: photometric changes only, so pixels stay aligned with their labels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fixmatch_loss(
    logits_strong: torch.Tensor,
    probs_weak: torch.Tensor,
    threshold: float,
    class_balance: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on confident pixels, averaged over all pixels (FixMatch's scaling:
    the loss grows as the model becomes confident on more of the pool).

    With ``class_balance`` each confident pixel is weighted by the inverse share of its
    pseudo-class among the confident pixels (weights averaging 1), so a common phase,
    on which the model is confident first, cannot drown a rare one.

    logits_strong (N, C, H, W) with grad; probs_weak (N, C, H, W) without. Returns the loss
    (exactly 0, still differentiable, when no pixel is confident) and the confident share
    (a 0-d tensor).
    """
    conf, pseudo = probs_weak.detach().max(1)
    keep = (conf >= threshold).float()
    if class_balance and keep.sum() > 0:
        counts = torch.bincount(pseudo[keep.bool()], minlength=probs_weak.shape[1]).float()
        present = counts > 0
        w_class = torch.zeros_like(counts)
        w_class[present] = counts.sum() / (present.sum() * counts[present])
        keep = keep * w_class[pseudo]
    ce = F.cross_entropy(logits_strong.float(), pseudo, reduction="none")
    return (ce * keep).mean(), (conf >= threshold).float().mean().detach()


def strong_augment(
    x: torch.Tensor, strength: float, cutout: float, generator: torch.Generator
) -> torch.Tensor:
    """Photometric strong augmentation of standardised tiles (N, 1, H, W), per tile:
    contrast x (1 +- strength), brightness +- strength (in standard deviations), Gaussian
    noise, a 3x3 blur for half the tiles, and one cut-out square of side ``cutout`` x H set
    to the image mean (0)."""
    n, _, h, w = x.shape

    def u(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, 1, 1, 1, generator=generator)

    s = strength
    y = x * u(1 - s, 1 + s) + u(-s, s)
    y = y + torch.randn(y.shape, generator=generator) * u(0, 0.5 * s)
    blur = torch.rand(n, generator=generator) < 0.5
    if blur.any():
        y[blur] = F.avg_pool2d(y[blur], 3, stride=1, padding=1, count_include_pad=False)
    side = int(round(cutout * h))
    if side > 0:
        ys = torch.randint(0, h - side + 1, (n,), generator=generator)
        xs = torch.randint(0, w - side + 1, (n,), generator=generator)
        for i in range(n):
            y[i, :, ys[i] : ys[i] + side, xs[i] : xs[i] + side] = 0.0
    return y


def ramp(step: int, rampup_steps: int) -> float:
    """Linear 0 -> 1 over ``rampup_steps`` (1 when there is no ramp)."""
    return 1.0 if rampup_steps <= 0 else min(1.0, (step + 1) / rampup_steps)


class WeakStrongPairs(torch.utils.data.Dataset):
    """(weak, strong) views of each unlabelled tile: the weak one (flips and turns) gives
    the pseudo-label, the strong one is trained on. The strong view is drawn from the
    item's own generator, so it is made in the DataLoader worker, off the model's path."""

    def __init__(self, tiles, strength: float, cutout: float) -> None:
        self.tiles, self.strength, self.cutout = tiles, strength, cutout

    def __len__(self) -> int:
        return len(self.tiles)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        weak = self.tiles[index]
        seed = int(self.tiles.generator(index, salt=13).integers(2**62))
        g = torch.Generator().manual_seed(seed)
        return weak, strong_augment(weak[None], self.strength, self.cutout, g)[0]
