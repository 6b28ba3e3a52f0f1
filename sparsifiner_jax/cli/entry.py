"""Shared entry point for train.py / eval.py: flags, distributed init, one-line errors.

User mistakes (bad flags, config values, paths, datasets, checkpoints) end with one line on stderr
and exit code 2, before anything is compiled or written (``config_check.validate`` runs first, its
TensorFlow-free checks before the dataset's, so most take seconds); any other error ends with one line
and exit code 1. ``--debug`` shows the traceback instead. A preempted run (SIGTERM) checkpoints and exits
with code 75. The flags are defined when a command runs (:func:`run_main`), not when this is imported.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from etils import epath
from ml_collections import config_flags

from sparsifiner_jax import config_check, sharding
from sparsifiner_jax.cli import env, errors
from sparsifiner_jax.data.options import InputConfigError
from sparsifiner_jax.evaluation import report
from sparsifiner_jax.io import checkpoint, paths, state_dict, weights
from sparsifiner_jax.train import trainer, workdir



@dataclasses.dataclass(frozen=True)
class CommonFlags:
  """``--config`` and ``--debug``: the flags every command of the project takes."""
  config: flags.FlagHolder
  debug: flags.FlagHolder


@dataclasses.dataclass(frozen=True)
class RunFlags:
  """train.py's and eval.py's flags."""
  common: CommonFlags
  workdir: flags.FlagHolder
  out: flags.FlagHolder
  weights: flags.FlagHolder
  step: flags.FlagHolder


def define_common_flags() -> CommonFlags:
  """Defines ``--config`` and ``--debug`` in absl's global flags. Commands call it when they run, never
  at import, so importing a command's module (as tests and benchmarks do) defines no flags."""
  return CommonFlags(
      config=config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                             lock_config=True),
      debug=flags.DEFINE_bool("debug", False, "Show tracebacks for errors."))


def define_run_flags() -> RunFlags:
  """:func:`define_common_flags` and train.py's and eval.py's own flags."""
  return RunFlags(
      common=define_common_flags(),
      workdir=flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, weights)."),
      out=flags.DEFINE_string("out", None, "eval.py: where to write the result JSON."),
      weights=flags.DEFINE_string("weights", None, "eval.py: a weights dir instead of the workdir's."),
      step=flags.DEFINE_string("step", None, "eval.py: the workdir's training checkpoint at this step "
                               "('latest': the newest) instead of its final/ or best/ weights."))


def _count_var(name: str) -> int:
  """The integer launch variable ``SPARSIFINER_JAX_<name>``; ValueError (one line) if unset or bad."""
  value = env.get(name)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f"{env.PREFIX}{name}={value!r} is not allowed with {env.PREFIX}COORDINATOR; "
                     "allowed: an integer >= 0") from None


def maybe_initialize_distributed() -> None:
  """``jax.distributed.initialize`` as the ``SPARSIFINER_JAX_*`` launch variables say (``env``)."""
  coordinator = env.get("COORDINATOR")
  if coordinator is not None:
    if env.get("CPU_COLLECTIVES", "1") == "1" and os.environ.get("JAX_PLATFORMS", "") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=_count_var("NUM_PROCESSES"),
                               process_id=_count_var("PROCESS_ID"))
  elif env.get("DISTRIBUTED") == "1":
    jax.distributed.initialize()


# Exceptions that are user mistakes: one line and exit code 2.
USER_ERRORS = (ValueError, FileNotFoundError, config_check.ConfigError, checkpoint.CheckpointError,
               state_dict.ConversionError, weights.WeightsError, InputConfigError, sharding.MeshError,
               workdir.TrainingError)


def _debug_in(argv) -> bool:
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


def parse_flags(argv):
  """absl's flag parsing, with bad flags and config overrides as one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  # flags.Error, and ml_collections' KeyError...
    if _debug_in(argv):
      raise
    msg = _unknown_field(e, argv) if isinstance(e, (KeyError, AttributeError)) else errors.one_line(e)
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


def load_config(common: CommonFlags):
  """``--config``'s value; a config file that failed to load (reported lazily) is a user error."""
  try:
    config = common.config.value
    if config is not None:
      config.get("seed")  # a placeholder for a failed load raises here
    return config
  except OSError as e:
    if common.debug.value:
      raise
    print(f"error: --config: {errors.one_line(e)}", file=sys.stderr)
    sys.exit(errors.EXIT_USER_ERROR)


def _resolved(holder: flags.FlagHolder) -> epath.Path | None:
  """A path flag's value resolved once (``paths.check_reachable``: a bad URL or bucket is one line), or
  None when it is not given."""
  return paths.check_reachable(holder.value, f"--{holder.name}") if holder.value else None


def _run(kind: str, f: RunFlags, config) -> None:
  """Resolves the path flags, starts the processes' collectives, validates ``config`` for ``kind`` and
  trains or evaluates; each path and check once, before anything is compiled or written."""
  workdir, weights_path, out = _resolved(f.workdir), _resolved(f.weights), _resolved(f.out)
  maybe_initialize_distributed()
  checked = config_check.validate(config, kind)
  if kind == "train":
    trainer.train_validated(config, workdir, checked)
  else:
    report.main(config, checked, workdir=workdir, weights_path=weights_path, step=f.step.value, out=out)


def run_main(kind: str) -> None:
  """train.py (``kind="train"``) and eval.py (``"eval"``): defines their flags and runs."""
  f = define_run_flags()

  def main(argv):
    del argv
    config = load_config(f.common)
    if config is None:
      raise app.UsageError("--config is required")
    if f.workdir.value is None and kind == "train":
      raise app.UsageError("--workdir is required")
    absl_logging.set_verbosity(absl_logging.INFO if f.common.debug.value else absl_logging.WARNING)
    try:
      _run(kind, f, config)
    except Exception as e:  # pylint: disable=broad-except
      if f.common.debug.value:
        raise
      sys.exit(errors.report(e, USER_ERRORS))

  app.run(main, flags_parser=parse_flags)
