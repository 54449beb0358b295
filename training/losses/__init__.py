"""One module per loss: contrastive, masked entity completion, cross-image mask consistency."""

from ovseg.training.losses.contrastive import ContrastiveLoss, contrastive_loss, gather_with_grad
from ovseg.training.losses.entity import EntityCompletionLoss
from ovseg.training.losses.mask_consistency import MaskConsistencyLoss, dice_loss

__all__ = ["ContrastiveLoss", "contrastive_loss", "gather_with_grad", "EntityCompletionLoss",
           "MaskConsistencyLoss", "dice_loss"]
