"""Config validation before anything is compiled or written: one line per mistake, saying what is allowed.

:func:`validate` is the one entry point: train.py, eval.py, ``trainer.train``, ``report`` and
``compile_for`` call it, and it runs each check once, in order, the TensorFlow-free ones first (so a
mistake in a field is reported in seconds): every field's type and range (the model's options through
``ViTConfig.validate``, which runs ``attention.patterns.validate``), the teacher, the phases, the mesh
and batch sizes against the devices; then ``config.input`` against the dataset
(``input_pipeline.validate_input_config``, TensorFlow); then what the running phases need.

Every error is a ``ConfigError`` (a ``ValueError``) whose message starts with the field,
``config.<path>=<value>``, and says what is allowed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from sparsifiner_jax import models, sharding
from sparsifiner_jax.io import paths
from sparsifiner_jax.train.phases import LOSS_TERMS, PHASES, TEACHER_TERMS

NONFINITE = ("stop", "skip")
PURPOSES = ("train", "eval", "compile")
# Fields every config holds (``configs/common.py``'s ``base_config()`` sets them): ``check_misc``
# refuses a config without one, so the trainer, the step and compile_for read them directly.
REQUIRED = ("seed", "batch_size", "eval_batch_size", "grad_accum", "ema_decay", "nonfinite", "mesh",
            "allow_config_change", "progress", "log_every", "eval_every", "ckpt_every", "keep_ckpts",
            "recon_reference_batch", "init", "teacher.weights", "mixup.prob", "mixup.mixup_alpha",
            "mixup.cutmix_alpha", "mixup.switch_prob", "mixup.label_smoothing")


class ConfigError(ValueError):
  """A config field has the wrong type or value; the message names it and what is allowed."""


_MISSING = object()


def _value(config, path: str):
  node = config
  for key in path.split("."):
    if node is None or not hasattr(node, "get"):
      return _MISSING
    node = node.get(key, _MISSING)
    if node is _MISSING:
      return _MISSING
  return node


def _fail(path: str, value: Any, problem: str) -> None:
  """Raises ``config.<path>=<value> <problem>``; problem says what is wrong and what is allowed."""
  raise ConfigError(f"config.{path}={value!r} {problem}")


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(config, path: str, lo: int | None = None, hi: int | None = None, *,
         optional: bool = False):
  """Checks an integer field in [lo, hi]; returns it (None when optional and unset or missing)."""
  v = _value(config, path)
  if v is _MISSING or (optional and v is None):
    return None
  if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
    rng = (f">= {lo}" if hi is None else f"in [{lo}, {hi}]") if lo is not None else ""
    _fail(path, v, f"is not allowed; allowed: an integer {rng}".rstrip() +
          (" or None" if optional else ""))
  return v


def _num(config, path: str, lo: float, hi: float | None = None, *, lo_open: bool = False,
         hi_open: bool = False):
  """Checks a number in the interval given by lo/hi (open ends as flagged); returns it."""
  v = _value(config, path)
  if v is _MISSING:
    return None
  ok = _is_num(v) and (v > lo if lo_open else v >= lo)
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    if hi is None:
      allowed = f"a number {'>' if lo_open else '>='} {lo}"
    else:
      allowed = f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    _fail(path, v, f"is not allowed; allowed: {allowed}")
  return v


def _choice(config, path: str, options) -> Any:
  v = _value(config, path)
  if v is not _MISSING and v not in options:
    _fail(path, v, f"is not allowed; allowed: {', '.join(repr(o) for o in options)}")
  return v


def _bool(config, path: str) -> None:
  v = _value(config, path)
  if v is not _MISSING and not isinstance(v, bool):
    _fail(path, v, "is not allowed; allowed: True or False")


def _path(config, path: str, what: str) -> str:
  """A path field: '' (unset) or an existing local path or gs:// URL (``io.paths``)."""
  v = _value(config, path)
  if v is _MISSING or v is None or v == "":
    return ""
  if not isinstance(v, str):
    _fail(path, v, f"is not allowed; allowed: a path to {what}, or ''")
  if not paths.check_reachable(v, f"config.{path}").exists():
    raise ConfigError(f"config.{path}={v!r} does not exist; allowed: a path to {what}, or ''")
  return v


# --------------------------------------------------------------------------------------------------
# Groups of fields.


def _model_kwargs(config) -> dict[str, Any]:
  """``config.model`` as ``models.create`` keywords, once it is known to be a ConfigDict."""
  model = _value(config, "model")
  if model is _MISSING or not hasattr(model, "to_dict"):
    _fail("model", model, "is not allowed; allowed: a ConfigDict of model options")
  return models.model_kwargs(config)


def check_model(config):
  """``model_name`` and ``model.*`` (via the model's own validation); returns the model config."""
  _choice(config, "model_name", models.names())
  try:
    cfg = models.get_config(config.model_name, **_model_kwargs(config))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.model: {e}") from None
  for name, lo, lo_open in (("mlp_ratio", 0, True), ("basis_threshold", 0, False)):
    v = getattr(cfg, name, None)
    if v is not None and not (_is_num(v) and (v > lo if lo_open else v >= lo)):
      _fail(f"model.{name}", v, f"is not allowed; allowed: a number {'>' if lo_open else '>='} {lo}")
  return cfg


def check_weight_paths(config) -> None:
  """``init`` and ``teacher.weights``: each '' or an existing weights directory (local or gs://)."""
  for field in ("init", "teacher.weights"):
    _path(config, field, "a weights directory (weights.save_weights or convert)")


def check_teacher(config) -> None:
  """``teacher.model_name`` and ``teacher.model``: the teacher's architecture (its weights:
  :func:`check_weight_paths`)."""
  name = _value(config, "teacher.model_name")
  if name not in (_MISSING, None, ""):
    _choice(config, "teacher.model_name", models.names())
  extra = _value(config, "teacher.model")
  if extra in (_MISSING, None):
    return
  extra = extra.to_dict() if hasattr(extra, "to_dict") else extra
  if not isinstance(extra, dict):
    _fail("teacher.model", extra, "is not allowed; allowed: a dict of model options")
  variant = models.VARIANTS[config.model_name if name in (_MISSING, None, "") else name]
  fields = {f.name for f in dataclasses.fields(variant)}
  unknown = sorted(set(extra) - fields)
  if unknown:
    _fail("teacher.model", extra, f"has unknown option(s) {unknown}; allowed: {sorted(fields)}")


def _running_phases(config):
  """(name, node) of the phases with a positive length, in the order they run."""
  phases = config.phases
  return [(n, phases[n]) for n in PHASES if n in phases and
          ((phases[n].get("steps", 0) or 0) > 0 or (phases[n].get("epochs", 0) or 0) > 0)]


def check_phases(config) -> None:
  """Phase names, lengths, schedules and loss weights."""
  phases = _value(config, "phases")
  if phases is _MISSING or not hasattr(phases, "keys"):
    _fail("phases", phases, f"is not allowed; allowed: a ConfigDict of phases among "
          f"{', '.join(PHASES)}")
  unknown = sorted(set(phases) - set(PHASES))
  if unknown:
    raise ConfigError(f"config.phases has unknown phase(s) {unknown}; allowed: {', '.join(PHASES)}")
  any_positive = False
  for name in phases:
    p = f"phases.{name}"
    epochs = _num(config, f"{p}.epochs", 0) or 0
    steps = _int(config, f"{p}.steps", 0, optional=True) or 0
    warm_epochs = _num(config, f"{p}.warmup_epochs", 0) or 0
    warm_steps = _int(config, f"{p}.warmup_steps", -1, optional=True)
    warm_steps = -1 if warm_steps is None else warm_steps
    _num(config, f"{p}.lr", 0, lo_open=True)
    _num(config, f"{p}.final_lr", 0)
    _num(config, f"{p}.weight_decay", 0)
    losses = _value(config, f"{p}.losses")
    losses = {} if losses in (_MISSING, None) else losses
    bad = sorted(set(losses) - set(LOSS_TERMS))
    if bad:
      _fail(f"{p}.losses", dict(losses), f"has unknown loss term(s) {bad}; allowed: "
            f"{', '.join(LOSS_TERMS)}")
    weights = {k: _num(config, f"{p}.losses.{k}", 0) for k in losses}
    if steps <= 0 and epochs <= 0:
      continue
    any_positive = True
    length = f"steps={steps}" if steps > 0 else f"epochs={epochs}"
    if steps > 0 and warm_steps > steps:
      _fail(f"{p}.warmup_steps", warm_steps, f"is longer than the phase ({length}); allowed: "
            f"-1 (use warmup_epochs) or 0..{steps}")
    if steps <= 0 and warm_steps < 0 and warm_epochs > epochs:
      _fail(f"{p}.warmup_epochs", warm_epochs, f"is longer than the phase ({length}); allowed: "
            f"0..{epochs}")
    if not any(w > 0 for w in weights.values()):
      _fail(f"{p}.losses", dict(losses), f"has no positive weight but the phase runs ({length}); "
            f"allowed: some of {', '.join(LOSS_TERMS)} > 0, or a phase length of 0")
  if not any_positive:
    raise ConfigError("config.phases: no phase has a positive length; allowed: set "
                      f"phases.<name>.epochs or .steps > 0 for some of {', '.join(PHASES)}")


def check_phase_needs(config, model_cfg) -> None:
  """What the running phases need: teacher weights for teacher losses, predictors for recon
  (``model_cfg``: :func:`check_model`'s result)."""
  has_teacher = _value(config, "teacher.weights") not in (_MISSING, None, "")
  learned = getattr(model_cfg, "attention_pattern", "sparsifiner") == "sparsifiner"
  for name, phase in _running_phases(config):
    losses = phase.get("losses", {}) or {}
    uses = [k for k in TEACHER_TERMS if (losses.get(k, 0) or 0) > 0]
    if uses and not has_teacher:
      raise ConfigError(f"config.phases.{name} uses the teacher loss(es) {uses} but "
                        "config.teacher.weights is empty; allowed: set teacher.weights to a weights "
                        f"directory, or phases.{name}.steps=0 and epochs=0")
    if (losses.get("recon", 0) or 0) > 0 and not (model_cfg.sparse and learned):
      raise ConfigError(f"config.phases.{name}.losses.recon={losses['recon']!r} trains the mask "
                        "predictors, which a dense model (model.keep_rate=None) or a fixed attention "
                        "pattern does not have; allowed: set model.keep_rate, or recon=0")


def check_devices(config, devices=None):
  """``mesh`` vs the devices, batch sizes vs devices, processes, data shards and grad_accum."""
  devices = list(devices if devices is not None else jax.devices())
  try:
    mesh = sharding.make_mesh(config.mesh, devices)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config.mesh={config.mesh!r}: {e}") from None
  n, procs = mesh.size, jax.process_count()
  accum = _int(config, "grad_accum", 1) or 1
  batch = _int(config, "batch_size", 1)
  if batch is not None and batch % n:
    _fail("batch_size", batch, f"must be divisible by the number of devices {n}; allowed: a "
          f"multiple of {n}")
  if batch is not None and batch % accum:
    _fail("batch_size", batch, f"must be divisible by grad_accum={accum}; allowed: a multiple of "
          f"{accum}")
  ev = _int(config, "eval_batch_size", 1)
  if ev is not None and ev % n:
    _fail("eval_batch_size", ev, f"must be divisible by the number of devices {n}; allowed: a "
          f"multiple of {n}")
  shards = _int(config, "input.data_shards", 1, optional=True)
  if shards is not None and (shards % procs or (batch and batch % shards)):
    _fail("input.data_shards", shards, f"is not allowed; allowed: a multiple of the number of "
          f"processes {procs} that divides batch_size={batch}, or None")
  return mesh


def check_required(config) -> None:
  """Every field of :data:`REQUIRED` is present."""
  for path in REQUIRED:
    if _value(config, path) is _MISSING:
      raise ConfigError(f"config.{path} is missing; allowed: a config built on configs/common.py's "
                        "base_config(), which sets every field")


def check_misc(config) -> None:
  check_required(config)
  _int(config, "seed", 0, 2 ** 32 - 1)
  _num(config, "ema_decay", 0, 1, hi_open=True)
  _choice(config, "nonfinite", NONFINITE)
  for name in ("allow_config_change", "progress"):
    _bool(config, name)
  _int(config, "log_every", 1)
  for name in ("eval_every", "ckpt_every"):
    _int(config, name, 0)
  _int(config, "keep_ckpts", 1)
  _int(config, "recon_reference_batch", 1)
  for name in ("prob", "switch_prob"):
    _num(config, f"mixup.{name}", 0, 1)
  for name in ("mixup_alpha", "cutmix_alpha"):
    _num(config, f"mixup.{name}", 0)
  _num(config, "mixup.label_smoothing", 0, 1, hi_open=True)
  dataset = _value(config, "input.dataset")
  if not isinstance(dataset, str) or not dataset:
    _fail("input.dataset", dataset, "is not allowed; allowed: 'digits', a tfds name or "
          "'imagefolder:/path'")


# --------------------------------------------------------------------------------------------------
# The entry point.


def check_data(config, model_cfg):
  """Checks ``config.input`` against the dataset (may prepare digits) and ``model_cfg``'s class count
  against it; returns its DatasetInfo."""
  from sparsifiner_jax.data import input_pipeline  # deferred: imports TensorFlow (seconds)
  input_pipeline.validate_input_config(config.input)
  info = input_pipeline.get_dataset_info(config.input)
  if model_cfg.num_classes < info.num_classes:
    _fail("model.num_classes", model_cfg.num_classes, f"is less than the {info.num_classes} classes of "
          f"dataset {info.name!r}; allowed: >= {info.num_classes}")
  return info


@dataclasses.dataclass(frozen=True)
class Checked:
  """What :func:`validate` found: the model's config, the mesh and the dataset (None for compile)."""
  model: Any
  mesh: Any = None
  info: Any = None


def validate(config, purpose: str, devices=None) -> Checked:
  """Runs every check ``purpose`` needs, once each, most basic first; raises ConfigError (one line).

  ``"train"``: fields, model, weight paths, teacher, phases, mesh and batch sizes against ``devices``
  (default: all), dataset, what the phases need. ``"eval"``: fields, model, devices, dataset.
  ``"compile"``: fields, model, teacher, phases; no devices (compile_for checks its batch against the
  topology's), no dataset and no paths (nothing is read).
  """
  if purpose not in PURPOSES:
    raise ValueError(f"purpose={purpose!r}; allowed: {', '.join(PURPOSES)}")
  check_misc(config)
  model_cfg = check_model(config)
  if purpose == "train":
    check_weight_paths(config)
  if purpose != "eval":
    check_teacher(config)
    check_phases(config)
  if purpose == "compile":
    return Checked(model_cfg)
  mesh = check_devices(config, devices)
  info = check_data(config, model_cfg)
  if purpose == "train":
    check_phase_needs(config, model_cfg)
  return Checked(model_cfg, mesh, info)
