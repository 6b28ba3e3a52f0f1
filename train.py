"""Train Sparsifiner (or a dense ViT):

  python train.py --config configs/digits_sparsifiner.py[:arg] --workdir DIR [--config.x.y=v ...]

Resumes automatically from DIR. Multi-process: set SPARSIFINER_JAX_COORDINATOR=host:port,
SPARSIFINER_JAX_NUM_PROCESSES and SPARSIFINER_JAX_PROCESS_ID (or run under a launcher that
jax.distributed auto-detects, with SPARSIFINER_JAX_DISTRIBUTED=1). sparsifiner_jax/cli/env.py lists them.
"""

from sparsifiner_jax.cli import entry

if __name__ == "__main__":
  entry.run_main("train")
