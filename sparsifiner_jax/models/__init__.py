"""Models: the zoo (``create(name, keep_rate=..., rngs=...)``), and models built from a config.

>>> from flax import nnx
>>> from sparsifiner_jax import models
>>> model = models.create("deit_small_patch16_224", keep_rate=0.25, rngs=nnx.Rngs(0))
>>> logits, aux = model(images, train=False)   # images: [B, 224, 224, 3] float32, normalised

``keep_rate=None`` builds the dense ViT (the teacher). Any ``ViTConfig`` field can be overridden by
keyword (``num_classes``, ``img_size``, ``patch_size``, ``executor``, ``reduce_n``, ``reduce_c``, ...).
``build_model(config)`` builds ``config.model_name`` with ``config.model``; ``split_params`` and
``merge_params`` are the one place that splits a model into its parameter groups and back;
``inference_constants``/``use_constants`` compute the predictors' parameter-only work once for fixed weights.
"""

from sparsifiner_jax.models.build import (build_model, build_teacher, inference_constants, merge_params,
                                         model_kwargs, predictors, split_params, teacher_model_kwargs,
                                         use_constants)
from sparsifiner_jax.models.lvvit import LVViT, LVViTConfig
from sparsifiner_jax.models.predictor import MaskPredictor
from sparsifiner_jax.models.vit import Attention, Block, ViTConfig, VisionTransformer
from sparsifiner_jax.models.zoo import BUILDERS, VARIANTS, cast_kernels, create, get_config, names

__all__ = ["Attention", "BUILDERS", "Block", "LVViT", "LVViTConfig", "MaskPredictor", "VARIANTS",
           "ViTConfig", "VisionTransformer", "build_model", "build_teacher", "cast_kernels", "create",
           "get_config", "inference_constants", "merge_params", "model_kwargs", "names", "predictors",
           "split_params", "teacher_model_kwargs", "use_constants"]
