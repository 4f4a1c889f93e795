#!/usr/bin/env bash
# Cloud TPU pod: create the TPU VM slice, install dmae_jax on every worker, run the same
# command on all of them. JAX discovers the other hosts itself (jax.distributed.initialize()
# with no arguments on a multi-host slice); data and workdir live on GCS.
#
#   ZONE=us-central2-b TPU=dmae-v4-128 TYPE=v4-128 BUCKET=gs://my-bucket \
#     bash launch/tpu_pod.sh configs/vit_large.py dmae_large [--config.key=value ...]
#
# ImageNet must already be prepared as ArrayRecord under $BUCKET/tfds (see README).
set -euo pipefail
CONFIG=${1:?usage: tpu_pod.sh CONFIG RUN_NAME [overrides...]}
RUN=${2:?usage: tpu_pod.sh CONFIG RUN_NAME [overrides...]}
shift 2
: "${ZONE:?set ZONE}" "${TPU:?set TPU (the TPU VM name)}" "${BUCKET:?set BUCKET (gs://...)}"
TYPE=${TYPE:-v4-128}
VERSION=${VERSION:-tpu-ubuntu2204-base}
REPO=${REPO:-https://github.com/YOUR_ORG/dmae_jax.git}

if ! gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU" --zone "$ZONE" --accelerator-type "$TYPE" \
    --version "$VERSION"
fi

gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d dmae_jax ] || git clone $REPO dmae_jax
  cd dmae_jax && git pull --ff-only
  pip install -q -U 'jax[tpu]>=0.10.2' && pip install -q -e .
"

# The same command on every worker; process 0 writes metrics and reports, every process
# takes part in the checkpoints (Orbax coordinates them). A preemption (SIGTERM) saves first.
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command "
  cd dmae_jax && python -m dmae_jax.main --config=$CONFIG \
    --workdir=$BUCKET/runs/$RUN --config.data.data_dir=$BUCKET/tfds $* \
    2>&1 | tee -a ~/dmae_$RUN.log
"
