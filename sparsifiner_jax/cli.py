"""Shared entry point for train.py / eval.py: flags, distributed init, one-line errors.

User mistakes (bad flags, config values, paths, datasets, checkpoints) end with one line on stderr
and exit code 2, before anything is compiled or written (``config_check`` runs first and imports no
TensorFlow, so this takes seconds); any other error ends with one line and exit code 1. ``--debug``
shows the traceback instead. A preempted run (SIGTERM) checkpoints and exits with code 75.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, weights).")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for errors.")
_OUT = flags.DEFINE_string("out", None, "eval.py: where to write the result JSON.")
_WEIGHTS = flags.DEFINE_string("weights", None, "eval.py: a weights dir instead of the workdir's.")
_STEP = flags.DEFINE_string("step", None, "eval.py: the workdir's training checkpoint at this step "
                            "('latest': the newest) instead of its final/ or best/ weights.")

# TensorFlow (the input pipeline) prints C++ notices on import; an error must be the only stderr line.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

EXIT_INTERNAL_ERROR = 1
EXIT_USER_ERROR = 2
# Exceptions that are user mistakes: (module, class); a class only counts once its module is imported
# (it cannot have been raised before), so reporting an error never imports TensorFlow.
_USER_ERRORS = (("config_check", "ConfigError"), ("checkpoint", "CheckpointError"),
                ("convert", "ConversionError"), ("weights", "WeightsError"),
                ("input_pipeline", "InputConfigError"), ("sharding", "MeshError"),
                ("trainer", "TrainingError"))


def maybe_initialize_distributed() -> None:
  import jax
  env = os.environ
  if "SPARSIFINER_COORDINATOR" in env:
    if env.get("SPARSIFINER_CPU_COLLECTIVES", "1") == "1" and env.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["SPARSIFINER_COORDINATOR"],
                               num_processes=int(env["SPARSIFINER_NUM_PROCESSES"]),
                               process_id=int(env["SPARSIFINER_PROCESS_ID"]))
  elif env.get("SPARSIFINER_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def _user_errors() -> tuple[type[BaseException], ...]:
  errors = [ValueError, FileNotFoundError]
  for module, name in _USER_ERRORS:
    mod = sys.modules.get(f"sparsifiner_jax.{module}")
    if mod is not None:
      errors.append(getattr(mod, name))
  return tuple(errors)


def _one_line(e: BaseException) -> str:
  """The message of ``e`` on one line; an embedded traceback (config file errors) becomes its last line."""
  text = str(e).strip()
  if "Traceback (most recent call last)" in text:
    text = text.split("Traceback (most recent call last)")[0] + " " + text.splitlines()[-1]
  return " ".join(text.split()) or type(e).__name__


def _debug_requested(argv) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


def _unknown_field(e: BaseException, argv) -> str:
  """ml_collections' KeyError for an override of a field the config does not have, as one line."""
  arg = e
  while isinstance(arg, BaseException) and arg.args:
    arg = arg.args[0]
  name, _, hint = " ".join(str(arg).split()).partition(" ")
  name = name.strip("'\"")
  flag = next((a.split("=")[0] for a in argv[1:]
               if a.startswith("--config.") and name in a.split("=")[0].split(".")), None)
  return (f"unknown config field {name!r}" + (f" in {flag}" if flag else "") +
          (f"; {hint}" if hint else "; the config file lists the fields"))


def _parse_flags(argv):
  """absl's flag parsing, with bad flags and config overrides as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, and ml_collections' KeyError...
    if _debug_requested(argv):
      raise
    msg = _unknown_field(e, argv) if isinstance(e, (KeyError, AttributeError)) else _one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _load_config():
  """``--config``'s value; a config file that failed to load (reported lazily) is a user error."""
  try:
    config = _CONFIG.value
    if config is not None:
      config.get("seed")  # a placeholder for a failed load raises here
    return config
  except OSError as e:
    if _DEBUG.value:
      raise
    print(f"error: --config: {_one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run_main(kind: str) -> None:
  def main(argv):
    del argv
    config = _load_config()
    if config is None:
      raise app.UsageError("--config is required")
    if _WORKDIR.value is None and kind == "train":
      raise app.UsageError("--workdir is required")
    absl_logging.set_verbosity(absl_logging.INFO if _DEBUG.value else absl_logging.WARNING)
    try:
      maybe_initialize_distributed()
      from sparsifiner_jax import config_check
      config_check.check_config(config, train=kind == "train")  # fast: before TensorFlow
      if kind == "train":
        from sparsifiner_jax import trainer
        trainer.train(config, _WORKDIR.value)
      else:
        from sparsifiner_jax import eval_lib
        eval_lib.main(config, workdir=_WORKDIR.value, weights_path=_WEIGHTS.value, step=_STEP.value,
                      out=_OUT.value)
    except Exception as e:  # pylint: disable=broad-except
      if _DEBUG.value:
        raise
      if isinstance(e, _user_errors()):
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
      print(f"error: {type(e).__name__}: {_one_line(e)} (run with --debug for the traceback)",
            file=sys.stderr)
      sys.exit(EXIT_INTERNAL_ERROR)

  app.run(main, flags_parser=_parse_flags)
