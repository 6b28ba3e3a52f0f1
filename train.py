"""Train Sparsifiner (or a dense ViT):

  python train.py --config configs/digits_sparsifiner.py[:arg] --workdir DIR [--config.x.y=v ...]

Resumes automatically from DIR. Multi-process: set SPARSIFINER_JAX_COORDINATOR=host:port,
SPARSIFINER_JAX_NUM_PROCESSES and SPARSIFINER_JAX_PROCESS_ID (or run under a launcher that
jax.distributed auto-detects, with SPARSIFINER_JAX_DISTRIBUTED=1). sparsifiner_jax/env.py lists them.
"""

from sparsifiner_jax import cli

if __name__ == "__main__":
  cli.run_main("train")
