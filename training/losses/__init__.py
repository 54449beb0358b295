"""One module per loss: contrastive, masked entity completion, group grounding, cross-image mask
consistency."""

from ovseg.training.losses.contrastive import contrastive_loss, gather_with_grad
from ovseg.training.losses.entity import entity_completion_loss
from ovseg.training.losses.grounding import grounding_loss, pooled_similarity
from ovseg.training.losses.mask_consistency import MaskConsistencyLoss, OfficialMaskConsistencyLoss, dice_loss, sample_dice_loss

__all__ = ["contrastive_loss", "gather_with_grad", "entity_completion_loss", "grounding_loss", "pooled_similarity", "MaskConsistencyLoss",
           "OfficialMaskConsistencyLoss", "dice_loss", "sample_dice_loss"]
