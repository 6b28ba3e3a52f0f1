"""Model weights on disk: an orbax directory that a config can name as ``init`` or ``teacher.weights``.

Layout of a weights directory ``DIR``::

    DIR/params/      orbax StandardCheckpointer tree: the model's weights (nnx.Param and BatchNorm
                     statistics, ``state_dict.WEIGHT_TYPES``) as a pure dict
    DIR/model.json   {"name": <models.create name>, "config": <ViTConfig fields>}

``DIR`` may be local or in a bucket (``gs://``). Writes are atomic (``io.atomic``): ``DIR`` is never
half-written; in a bucket ``model.json`` is removed first and written last, so a directory without it
is incomplete and refused. Training workdirs
(``io.checkpoint``) are different: they hold the full train state.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from sparsifiner_jax.cli import errors
from sparsifiner_jax.io import atomic, paths, state_dict


class WeightsError(ValueError):
  """A weights directory is missing, unreadable or does not fit the model."""


def model_meta(model: nnx.Module, name: str | None = None) -> dict[str, Any]:
  cfg = dataclasses.asdict(model.config)
  return {"name": name, "config_type": type(model.config).__name__, "config": cfg}


def _this_process_only() -> ocp.options.MultiprocessingOptions:
  """Orbax options for a write by this process alone (no barrier waits for the other processes)."""
  if jax.process_count() == 1:
    return ocp.options.MultiprocessingOptions()
  p = jax.process_index()
  return ocp.options.MultiprocessingOptions(primary_host=p, active_processes={p})


def save_weights(path: str, model: nnx.Module, *, name: str | None = None,
                 evaluation: dict[str, Any] | None = None) -> str:
  """Saves ``model``'s weights (and its config) to ``path`` atomically; returns the absolute path.

  ``evaluation``: recorded in ``model.json`` as ``"evaluation"`` (the trainer's ``best/`` keeps the
  top-1 it was chosen by, so a resumed run compares against it).

  Multi-process: one process writes (the arrays must be fully addressable to it, e.g. gathered).
  """
  params = jax.device_get(nnx.to_pure_dict(state_dict.weight_state(model)))

  def write(tmp):
    with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
      ckptr.save(os.path.join(tmp, "params"), params)
      ckptr.wait_until_finished()
    with open(os.path.join(tmp, "model.json"), "w") as f:
      meta = model_meta(model, name)
      if evaluation is not None:
        meta["evaluation"] = evaluation
      json.dump(meta, f, indent=1, default=list)

  return atomic.write_dir(path, write, last="model.json")


def read_meta(path) -> dict[str, Any]:
  root = paths.resolve(path, "weights")
  path, meta_path = os.fspath(path), root / "model.json"
  if not root.is_dir():
    raise WeightsError(f"weights directory {path!r} does not exist")
  try:
    return json.loads(meta_path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise WeightsError(f"{os.fspath(meta_path)!r} is missing or unreadable ({e}); is {path!r} a weights "
                       "directory written by sparsifiner_jax (weights.save_weights or convert)?") from e


def read_state_dict(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A weights directory as ``(timm-style state dict, model.json content)``."""
  meta = read_meta(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.restore(paths.resolve(path) / "params")
  except Exception as e:  # orbax raises many types for corrupt/missing data
    raise WeightsError(f"cannot read parameters from {path!r}: {errors.with_type(e)}") from e
  flat = state_dict.flatten(saved)
  return {state_dict.timm_key(p): state_dict.to_timm(p, np.asarray(v)) for p, v in flat.items()}, meta


def load_weights(path: str, model: nnx.Module, *, allow_missing_predictor: bool = True) -> nnx.Module:
  """Restores weights saved by :func:`save_weights` into ``model`` (in place) and returns it.

  The backbone must match exactly (names and shapes). A dense checkpoint may be loaded into a
  Sparsifiner model: the predictors keep their initialisation unless ``allow_missing_predictor=False``.
  """
  sd, _ = read_state_dict(path)
  try:
    state_dict.load_timm_state_dict(model, sd, allow_missing_predictor=allow_missing_predictor)
  except state_dict.ConversionError as e:
    raise WeightsError(f"weights at {path!r} do not fit the model: {e}") from e
  return model
