"""Models from a training config, and their parameter groups.

``build_model(config)`` is ``config.model_name`` with ``config.model``'s fields; the teacher is the dense
version of the same architecture (``build_teacher``). ``split_params``/``merge_params`` are the one
place that knows the parameter groups and the order ``nnx.merge`` takes them in;
``inference_constants``/``use_constants`` carry the predictors' parameter-only work out of a forward
whose weights stay fixed.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from sparsifiner_jax.models import zoo
from sparsifiner_jax.models.predictor import MaskPredictor

IS_PREDICTOR = nnx.All(nnx.Param, nnx.PathContains("mask_predictor"))


def model_kwargs(config) -> dict[str, Any]:
  """``config.model`` as ``models.create`` keywords; None means the variant's default (not keep_rate)."""
  return {k: v for k, v in config.model.to_dict().items() if v is not None or k == "keep_rate"}


def build_model(config, *, seed: int | None = None) -> nnx.Module:
  """``config.model_name`` built with ``config.model``, initialised from ``seed`` (default config.seed)."""
  return zoo.create(config.model_name, rngs=nnx.Rngs(config.seed if seed is None else seed),
                    **model_kwargs(config))


def teacher_model_kwargs(config) -> dict[str, Any]:
  """The teacher is the dense version of the student architecture unless ``teacher.model`` says more."""
  kw = {k: v for k, v in model_kwargs(config).items()
        if k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                 "num_heads", "mlp_ratio", "qkv_bias", "dtype", "token_order")}
  kw.update(config.teacher.get("model", {}) or {})
  kw["keep_rate"] = None
  return kw


def build_teacher(config) -> nnx.Module:
  """The (untrained) dense teacher of ``config``: ``teacher.model_name`` or the student's architecture."""
  return zoo.create(config.teacher.get("model_name") or config.model_name, rngs=nnx.Rngs(0),
                    **teacher_model_kwargs(config))


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, nnx.State], nnx.State]:
  """``(graphdef, {"backbone": State, "predictor": State}, rest)``: the parameter groups that training
  freezes or trains per phase (``mask_predictor`` params vs all other params) and the non-parameter
  state (``rest``: BatchNorm statistics, RNG counters). ``merge_params`` inverts it."""
  graphdef, predictor, backbone, rest = nnx.split(model, IS_PREDICTOR, nnx.Param, ...)
  return graphdef, {"backbone": backbone, "predictor": predictor}, rest


def merge_params(graphdef: nnx.GraphDef, params: dict[str, nnx.State], rest: nnx.State) -> nnx.Module:
  """The model of ``split_params``'s pieces (``params`` may hold updated or cast arrays)."""
  return nnx.merge(graphdef, params["predictor"], params["backbone"], rest)


def predictors(model: nnx.Module) -> list[MaskPredictor]:
  """The model's learned mask predictors, in graph order."""
  return [node for _, node in nnx.iter_graph(model) if isinstance(node, MaskPredictor)]


def inference_constants(graphdef: nnx.GraphDef, params: dict[str, nnx.State], rest: nnx.State
                        ) -> list[Any]:
  """Per predictor (``predictors`` order), block mode's parameter-only kernel operands
  (``MaskPredictor.kernel_constants``; None in token mode): for weights that stay fixed over many
  forwards (evaluation), computed once ahead like ``cast_kernels``, instead of in every forward;
  ``use_constants`` hands them to the merged model. The outputs are bit-identical."""
  model = merge_params(graphdef, params, rest)
  return [p.kernel_constants() if p.block else None for p in predictors(model)]


def use_constants(model: nnx.Module, constants: list[Any] | None) -> nnx.Module:
  """``model`` with ``inference_constants``' operands set on its predictors (None: computed per call)."""
  if constants is not None:
    for predictor, consts in zip(predictors(model), constants, strict=True):
      predictor.prepared = consts
  return model
