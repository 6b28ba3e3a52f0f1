"""Shared entry point for train.py / eval.py: flags, distributed init, one-line errors.

User mistakes (bad config values, paths, datasets, checkpoints) end with one line on stderr and exit
code 2; ``--debug`` shows the traceback instead.
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

EXIT_USER_ERROR = 2


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


def _user_errors():
  from sparsifiner_jax import checkpoint, convert, input_pipeline, sharding, trainer, weights
  return (ValueError, FileNotFoundError, checkpoint.CheckpointError, convert.ConversionError,
          weights.WeightsError, input_pipeline.InputConfigError, sharding.MeshError,
          trainer.TrainingError)


def run_main(kind: str) -> None:
  def main(argv):
    del argv
    if _CONFIG.value is None:
      raise app.UsageError("--config is required")
    if _WORKDIR.value is None and kind == "train":
      raise app.UsageError("--workdir is required")
    absl_logging.set_verbosity(absl_logging.INFO if _DEBUG.value else absl_logging.WARNING)
    try:
      maybe_initialize_distributed()
      if kind == "train":
        from sparsifiner_jax import trainer
        trainer.train(_CONFIG.value, _WORKDIR.value)
      else:
        from sparsifiner_jax import eval_lib
        eval_lib.main(_CONFIG.value, workdir=_WORKDIR.value, weights_path=_WEIGHTS.value,
                      out=_OUT.value)
    except _user_errors() as e:
      if _DEBUG.value:
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(EXIT_USER_ERROR)

  app.run(main)
