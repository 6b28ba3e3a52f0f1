"""The input options (``config.input``) and their defaults, without importing TensorFlow (configs and
``config_check`` load this; ``data.input_pipeline`` reads the options)."""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DIGITS = "digits"
# The DeiT / Sparsifiner recipe's RandAugment: magnitude 9 (std 0.5), the "increasing" op variants.
OFFICIAL_RANDAUGMENT = "rand-m9-mstd0.5-inc1"


class InputConfigError(ValueError):
  """``input_cfg`` names data that does not exist or cannot be read; the message is one line."""


def default_config() -> ml_collections.ConfigDict:
  """An ``input_cfg`` with every field at its default (DeiT ImageNet recipe, digits data)."""
  return ml_collections.ConfigDict(dict(
      dataset=DIGITS,
      data_dir=ml_collections.FieldReference(None, field_type=str),
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      train_split="train",
      eval_split="test",
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      crop_pct=0.875,
      rrc_scale=(0.08, 1.0),
      rrc_ratio=(3 / 4, 4 / 3),
      hflip=True,
      randaugment=OFFICIAL_RANDAUGMENT,
      random_erasing=0.25,
      shuffle_buffer=10_000,
      cache=False,
      bad_images="fail",
      data_shards=ml_collections.FieldReference(None, field_type=int),
  ))
