"""Loss for supervised segmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from srpu_pipelines.config import IGNORE_INDEX, LossParams


class SegLoss(nn.Module):
    """``ce_weight`` x cross-entropy + ``dice_weight`` x soft Dice; 255 pixels are ignored.

    Cross-entropy gets optional class weights; Dice treats every class equally, which is
    what keeps a phase covering 1-4 % of pixels from being ignored.
    """

    def __init__(self, p: LossParams):
        super().__init__()
        self.ce_w, self.dice_w = p.ce_weight, p.dice_weight
        w = torch.tensor(p.class_weights, dtype=torch.float32) if p.class_weights else None
        self.register_buffer("class_weights", w, persistent=False)
        self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=IGNORE_INDEX)

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
        return loss
