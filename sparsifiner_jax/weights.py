"""Model weights on disk: an orbax checkpoint directory that a config can name as ``init`` or ``teacher``.

Layout of a weights directory ``DIR``::

    DIR/params/      orbax StandardCheckpointer tree: the model's nnx.Param state as a pure dict
    DIR/model.json   {"name": <models.create name>, "config": <ViTConfig fields>}

Writes go to ``DIR.tmp-<pid>`` and are renamed into place, so ``DIR`` is never half-written.
Training workdirs (``sparsifiner_jax.checkpoint``) are different: they hold the full train state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx


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


def save_weights(path: str, model: nnx.Module, *, name: str | None = None) -> str:
  """Saves ``model``'s parameters (and its config) to ``path`` atomically; returns the path.

  Multi-process: one process writes (the arrays must be fully addressable to it, e.g. gathered).
  """
  path = os.path.abspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  from sparsifiner_jax import convert  # Params and BatchNorm statistics (LV-ViT)
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, convert.WEIGHT_TYPES)))
  with ocp.StandardCheckpointer(multiprocessing_options=_this_process_only()) as ckptr:
    ckptr.save(os.path.join(tmp, "params"), params)
    ckptr.wait_until_finished()
  with open(os.path.join(tmp, "model.json"), "w") as f:
    json.dump(model_meta(model, name), f, indent=1, default=list)
  if os.path.exists(path):
    shutil.rmtree(path)
  os.replace(tmp, path)
  return path


def read_meta(path: str) -> dict[str, Any]:
  meta_path = os.path.join(path, "model.json")
  if not os.path.isdir(path):
    raise WeightsError(f"weights directory {path!r} does not exist")
  try:
    with open(meta_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WeightsError(f"{meta_path!r} is missing or unreadable ({e}); is {path!r} a weights "
                       "directory written by sparsifiner_jax (weights.save_weights or convert)?") from e


def load_weights(path: str, model: nnx.Module, *, allow_missing_predictor: bool = True) -> nnx.Module:
  """Restores parameters saved by :func:`save_weights` into ``model`` (in place) and returns it.

  The backbone must match exactly (names and shapes). A dense checkpoint may be loaded into a
  Sparsifiner model: the predictors keep their initialisation unless ``allow_missing_predictor=False``.
  """
  read_meta(path)
  try:
    with ocp.StandardCheckpointer() as ckptr:
      saved = ckptr.restore(os.path.join(os.path.abspath(path), "params"))
  except Exception as e:  # orbax raises many types for corrupt/missing data
    raise WeightsError(f"cannot read parameters from {path!r}: {type(e).__name__}: {e}") from e
  from sparsifiner_jax import convert  # the same key/shape checks as for timm dicts
  flat_saved = convert._flatten(saved)  # noqa: SLF001
  sd = {convert.timm_key(p): convert.to_timm(p, np.asarray(v)) for p, v in flat_saved.items()}
  try:
    convert.load_timm_state_dict(model, sd, allow_missing_predictor=allow_missing_predictor)
  except convert.ConversionError as e:
    raise WeightsError(f"weights at {path!r} do not fit the model: {e}") from e
  return model
