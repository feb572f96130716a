#!/bin/bash
# Run florax on every worker of a Cloud TPU pod slice (one process per host).
# jax.distributed.initialize() discovers the slice from the TPU metadata, and
# JAX's preemption service turns a maintenance/preemption notice into a
# synchronised checkpoint at a step all hosts agree on.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/florence.py:l /mnt/shared/runs/l \
#       --config.sharding.zero_stage=3 --config.model.dtype=bfloat16
#
# The repository must already be on every worker at ~/florax with its
# requirements installed (e.g. `gcloud compute tpus tpu-vm ssh ... --worker=all
# --command="git clone ... florax && pip install -e florax"`). The workdir
# must be a filesystem all hosts mount (NFS / Filestore; the model-spec
# check writes it with plain file I/O, so not a gs:// path). Re-run to resume.
set -euo pipefail
TPU=${1:?usage: launch/tpu_vm.sh TPU_NAME ZONE CONFIG WORKDIR [--config.* ...]}
ZONE=${2:?zone}
CONFIG=${3:?config}
WORKDIR=${4:?workdir}
shift 4
EXTRA="$*"

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd ~/florax && nohup python -m launch.train --config '$CONFIG' \
    --workdir '$WORKDIR' $EXTRA > ~/florax_train.log 2>&1 &
  echo started on \$(hostname)"
echo "logs: gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=0 --command 'tail -f ~/florax_train.log'"
