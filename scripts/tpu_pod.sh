#!/usr/bin/env bash
# Runs one training command on every worker of a Cloud TPU VM slice (the same command on each host).
#
#   scripts/tpu_pod.sh TPU_NAME ZONE WORKDIR [train.py flags...]
#
# Each worker needs the repository at ~/sparsifiner_jax with its .venv (`make .venv/.installed`, then
# `pip install "jax[tpu]==0.10.2"` on TPU VMs), the dataset readable (config.input.data_dir), and
# WORKDIR where every worker can reach it: gs://BUCKET/PATH or a shared filesystem (docs/launch.md). jax.distributed finds the other
# workers by itself (SPARSIFINER_JAX_DISTRIBUTED=1). Re-running the same command resumes the run.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [train.py flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 workdir=$3
shift 3
flags=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command \
  "cd ~/sparsifiner_jax && SPARSIFINER_JAX_DISTRIBUTED=1 .venv/bin/python train.py --workdir $(printf %q "$workdir")$flags"
