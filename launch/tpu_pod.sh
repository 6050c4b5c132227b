#!/usr/bin/env bash
# Starts a training run on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/cifar10_ddpm.py gs://BUCKET/runs/cifar10 [--config.x=y ...]
#
# Copies this repository to all workers, installs it, and runs launch.train on
# each with --multihost; the workdir must be shared storage (a GCS bucket) so
# that every host writes the same checkpoints. Rerunning resumes the run.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)

gcloud compute tpus tpu-vm scp --recurse --worker=all --zone="$zone" \
  "$repo" "$tpu":~/diffusion_jax
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" --command="
  set -e
  cd ~/diffusion_jax
  python3 -m venv .venv && . .venv/bin/activate
  pip install -q -e . 'jax[tpu]'
  python -m launch.train --config=$config --workdir=$workdir --multihost $*
"
