#!/bin/bash
# Train moejax on a multi-host Cloud TPU VM slice (e.g. v5p-64: 8 hosts x 4 chips).
#
#   launch/tpu_pod_train.sh TPU_NAME ZONE configs/mixtral_8x7b.py /mnt/shared/runs/mixtral \
#       [--config.K=V ...]
#
# Template: the same command runs on every worker (--worker=all). Each host runs one process;
# MOEJAX_DISTRIBUTED=auto makes moejax.mesh.init_distributed call jax.distributed.initialize()
# with JAX's TPU detection (coordinator = worker 0, process id = worker index). Each process
# reads only its rows of every batch; the workdir must be one directory all hosts see (a
# Filestore/NFS mount, or a bucket mounted with gcsfuse): one checkpoint, written by all together. The repository and
# an environment with moejax installed (pip install -e . && pip install 'jax[tpu]') must be on
# every worker first, e.g. with a --worker=all command that clones and installs.
# Plan first: python launch/train.py --config=CONFIG --dry_run --simulated_devices=N.
set -euo pipefail

TPU_NAME=${1:?usage: tpu_pod_train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
ZONE=${2:?usage: tpu_pod_train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
CONFIG=${3:?usage: tpu_pod_train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
WORKDIR=${4:?usage: tpu_pod_train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.KEY=VALUE ...]}
shift 4
REPO_DIR=${REPO_DIR:-\$HOME/moejax}   # where the repository lives on the workers

# Quote the overrides for the remote shell.
EXTRA=""
for arg in "$@"; do EXTRA+=" $(printf '%q' "$arg")"; done

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="
  set -e
  cd $REPO_DIR
  export MOEJAX_DISTRIBUTED=auto PYTHONUNBUFFERED=1
  python launch/train.py --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")$EXTRA
"
