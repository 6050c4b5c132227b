#!/usr/bin/env bash
# Starts a training run on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/cifar10_ddpm.py gs://BUCKET/runs/cifar10 [--config.x=y ...]
#
# Ships this repository to every worker as ~/diffusion_jax (replaced on each
# launch), prepares Python there and runs launch.train --multihost on each. The
# workdir must be shared storage (a GCS bucket) so that every host writes the
# same checkpoints. Rerunning resumes the run. The only gcloud calls, in order:
#
#   gcloud compute tpus tpu-vm scp ARCHIVE TPU_NAME:~/diffusion_jax.tar.gz --worker=all --zone=ZONE
#   gcloud compute tpus tpu-vm ssh TPU_NAME --worker=all --zone=ZONE --command=SCRIPT
#
# SCRIPT unpacks the archive, runs the setup and then launch.train with CONFIG,
# WORKDIR and FLAGS shell-quoted: values with spaces or quotes arrive intact.
#
# Environment:
#   DIFFUSION_JAX_REF    a commit, tag or branch of this repository to ship
#                        instead of the checkout's files (tracked and untracked,
#                        less what .gitignore excludes). Pin it for long runs: a
#                        relaunch weeks later then runs the same code.
#   DIFFUSION_JAX_SETUP  the shell commands that make `python` ready on a worker,
#                        run in the unpacked tree. Default: a venv with the tree
#                        and JAX for TPUs installed,
#                          python3 -m venv ~/diffusion_jax_venv
#                          . ~/diffusion_jax_venv/bin/activate
#                          pip install -q -e . 'jax[tpu]'
#                        e.g. add ==VERSION to pin JAX too, or activate an
#                        environment the VM image already has.
#
# Rehearsal off-TPU: --multihost takes the coordinator and ranks from TPU
# metadata, but a worker whose environment sets JAX_COORDINATOR_ADDRESS,
# JAX_NUM_PROCESSES and JAX_PROCESS_ID uses those instead
# (parallel.maybe_initialize_distributed). tests/test_cluster_launchers.py runs
# this script with a gcloud stand-in whose workers are local processes, training
# into a gs:// workdir served by a local GCS emulator.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [FLAGS...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=$(cd "$(dirname "$0")/.." && pwd)
default_setup="python3 -m venv ~/diffusion_jax_venv
. ~/diffusion_jax_venv/bin/activate
pip install -q -e . 'jax[tpu]'"
setup=${DIFFUSION_JAX_SETUP:-$default_setup}

# Writes the tree to ship, as a gzipped tar, to $1.
pack() {
  if [[ -n ${DIFFUSION_JAX_REF:-} ]]; then
    local commit
    commit=$(git -C "$repo" rev-parse --verify --quiet "${DIFFUSION_JAX_REF}^{commit}") || {
      echo "$0: DIFFUSION_JAX_REF=${DIFFUSION_JAX_REF} is no commit of $repo" >&2
      exit 2
    }
    echo "Shipping diffusion_jax at ${DIFFUSION_JAX_REF} (${commit})." >&2
    git -C "$repo" archive --format=tar "$commit" | gzip >"$1"
  elif git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    git -C "$repo" ls-files -z --cached --others --exclude-standard |
      while IFS= read -r -d '' file; do
        if [[ -e $repo/$file ]]; then printf '%s\0' "$file"; fi  # not deleted since committed
      done |
      tar -czf "$1" -C "$repo" --null -T -
  else
    tar -czf "$1" -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./workdirs .
  fi
}

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
pack "$staging/diffusion_jax.tar.gz"

train=$(printf '%q ' python -m launch.train "--config=$config" "--workdir=$workdir" \
  --multihost "$@")
remote="set -euo pipefail
rm -rf ~/diffusion_jax && mkdir ~/diffusion_jax && cd ~/diffusion_jax
tar -xzf ~/diffusion_jax.tar.gz
$setup
exec $train"

gcloud compute tpus tpu-vm scp "$staging/diffusion_jax.tar.gz" "$tpu:~/diffusion_jax.tar.gz" \
  --worker=all --zone="$zone"
gcloud compute tpus tpu-vm ssh "$tpu" --worker=all --zone="$zone" --command="$remote"
