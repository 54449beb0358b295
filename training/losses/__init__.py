"""One module per loss: contrastive, masked entity completion, cross-image mask consistency."""

from ovseg.training.losses.contrastive import contrastive_loss, gather_with_grad
from ovseg.training.losses.entity import entity_completion_loss
from ovseg.training.losses.mask_consistency import MaskConsistencyLoss, dice_loss

__all__ = ["contrastive_loss", "gather_with_grad", "entity_completion_loss", "MaskConsistencyLoss", "dice_loss"]
