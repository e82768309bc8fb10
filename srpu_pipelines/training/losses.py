"""Loss for supervised segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss, LovaszLoss
from torch import nn

from srpu_pipelines.config import IGNORE_INDEX, LossParams
from srpu_pipelines.errors import InputError


def _erode(x: torch.Tensor) -> torch.Tensor:
    # a plus-shaped 3 x 3 erosion (min over the 4-neighbourhood), as in clDice
    return torch.minimum(-F.max_pool2d(-x, (3, 1), 1, (1, 0)), -F.max_pool2d(-x, (1, 3), 1, (0, 1)))


def _dilate(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, 1, 1)


def skeleton(x: torch.Tensor, iters: int = 8) -> torch.Tensor:
    """Morphological skeleton of binary masks (N, 1, H, W) in {0, 1} (clDice's soft
    skeleton, exact on binary input): what remains of each object after ``iters``
    erosions, kept where an opening would remove it. Objects up to ~2 x iters px thick
    get a complete centre line."""
    opened = _dilate(_erode(x))
    skel = F.relu(x - opened)
    for _ in range(iters):
        x = _erode(x)
        delta = F.relu(x - _dilate(_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


class SegLoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice (+ ``skeleton_weight`` x
    skeleton recall for ``skeleton_classes``, + ``lovasz_weight`` x Lovasz-softmax); 255
    pixels are ignored.

    Cross-entropy gets optional class weights; Dice treats every class equally, which is
    what keeps a phase covering 1-4 % of pixels from being ignored. Skeleton recall
    (Kirchhoff et al., ECCV 2024) is 1 - the predicted probability of the class averaged
    over the labelled objects' centre lines (widened by 1 px): a crack a few pixels wide
    counts along its whole length, however few pixels it has.
    """

    def __init__(self, p: LossParams, class_names: list[str] | None = None):
        super().__init__()
        self.ce_w, self.dice_w, self.skel_w = p.ce_weight, p.dice_weight, p.skeleton_weight
        self.lovasz_w = p.lovasz_weight
        cw = p.class_weights if isinstance(p.class_weights, list) else None
        w = torch.tensor(cw, dtype=torch.float32) if cw else None
        self.register_buffer("class_weights", w, persistent=False)
        self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)
        # Berman et al. 2018: the IoU of each class present in the batch, made smooth
        self.lovasz = LovaszLoss("multiclass", ignore_index=IGNORE_INDEX)
        names = class_names or []
        missing = [c for c in p.skeleton_classes if c not in names]
        if self.skel_w and missing:
            raise InputError(f"loss.skeleton_classes: {missing} are not classes of {names}")
        self.skel_classes = [names.index(c) for c in p.skeleton_classes] if self.skel_w else []

    def skeleton_recall(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(1)
        losses = []
        for c in self.skel_classes:
            with torch.no_grad():
                skel = _dilate(skeleton((target == c).float()[:, None]))[:, 0]
                skel = skel * (target != IGNORE_INDEX)
            total = skel.sum()
            if total > 0:  # a batch without the class adds nothing
                losses.append(1.0 - (probs[:, c] * skel).sum() / total)
        return torch.stack(losses).mean() if losses else logits.new_zeros(())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits (N, C, H, W), target (N, H, W) int64 -> scalar."""
        logits = logits.float()
        loss = logits.new_zeros(())
        if self.ce_w:
            loss = loss + self.ce_w * F.cross_entropy(
                logits, target, weight=self.class_weights, ignore_index=IGNORE_INDEX
            )
        if self.dice_w:
            loss = loss + self.dice_w * self.dice(logits, target)
        if self.skel_w:
            loss = loss + self.skel_w * self.skeleton_recall(logits, target)
        if self.lovasz_w:
            loss = loss + self.lovasz_w * self.lovasz(logits, target)
        return loss
