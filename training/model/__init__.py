"""The OVSegmentor model: image encoder with grouping, text encoder, projectors (losses live in
ovseg.training.losses)."""

from ovseg.training.model.config import ModelConfig
from ovseg.training.model.ovsegmentor import ImageEncoding, OVSegmentor, build_model, parameter_counts, parameter_table

__all__ = ["ModelConfig", "OVSegmentor", "ImageEncoding", "build_model", "parameter_counts",
           "parameter_table"]
