#!/usr/bin/env bash
# The nightly learning run, with the commands that exist today. Run by the CronJob (deploy/k8s/trainer.yaml) and by
# the cron entry (deploy/cron/alignloop-nightly.cron); every stage reads the registry, Kafka and the image store
# from ALIGNLOOP_REGISTRY, ALIGNLOOP_KAFKA and ALIGNLOOP_IMAGE_STORE.
#
#   1. snapshot   `alignloop feedback snapshot`: both topics since the last snapshot into a new dataset version
#   2. reward     `alignloop train reward`: the reward head on the snapshot's votes, gated, published (live if not worse)
#   3. fine-tune  one LoRA method per GPU, `alignloop train <method>`, each published as a candidate adapter
#
# torchrun launches stage 3, one process per GPU, each with its GPU and its LOCAL_RANK. The trainers are single-process
# today (no process group), so the processes are independent runs of different methods, not data parallelism; a rank
# past the method list does nothing. If one fails, torchrun stops the others and the night fails.
#
# Settings (the CronJob sets them; the defaults suit one machine):
#   NIGHTLY_DATA     folder for snapshots and run folders (default: $ALIGNLOOP_HOME/nightly). Keep it stable: the
#                    snapshot's consumer group is derived from the snapshot folder's path.
#   NIGHTLY_GPUS     processes under torchrun (default 1)
#   NIGHTLY_METHODS  LoRA methods, rank i trains the i-th (default "ppo")
#   NIGHTLY_OMP_THREADS  CPU threads per torchrun process (default 4)
set -euo pipefail

DATA=${NIGHTLY_DATA:-${ALIGNLOOP_HOME:-$HOME/.cache/alignloop}/nightly}
SNAPSHOTS="$DATA/snapshots"
RUNS="$DATA/runs/$(date -u +%Y-%m-%d)"  # a rerun the same day resumes the same run folders
read -r -a METHODS <<< "${NIGHTLY_METHODS:-ppo}"

# The models serving uses (config.yaml), so that the reward head reads the CLIP serving scores with and the adapters
# fit the UNet serving draws with; the bundled tiny models when they are not set.
GENERATOR=${ALIGNLOOP_SERVE_GENERATOR:-shapes-sd-tiny}
CLIP_ARGS=(--clip "${ALIGNLOOP_SERVE_CLIP:-shapes-clip-tiny}")
if [ -n "${ALIGNLOOP_SERVE_CLIP_CHECKPOINT:-}" ]; then
    CLIP_ARGS+=(--clip-checkpoint "$ALIGNLOOP_SERVE_CLIP_CHECKPOINT")
fi

finetune_rank() {
    # One torchrun process: the method of its rank, on its own GPU.
    local rank=${LOCAL_RANK:?finetune-rank runs under torchrun}
    if [ "$rank" -ge "${#METHODS[@]}" ]; then
        echo "nightly: rank $rank has no method (NIGHTLY_METHODS=${METHODS[*]}); idle"
        return 0
    fi
    local method=${METHODS[$rank]}
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then  # the GPUs this container was given: take the rank-th of them
        IFS=, read -r -a gpus <<< "$CUDA_VISIBLE_DEVICES"
        export CUDA_VISIBLE_DEVICES=${gpus[$rank]}
    else
        export CUDA_VISIBLE_DEVICES=$rank
    fi
    export OMP_NUM_THREADS=${NIGHTLY_OMP_THREADS:-4}  # torchrun sets 1; image decoding and scoring want a few
    echo "nightly: rank $rank trains $method on GPU $CUDA_VISIBLE_DEVICES"
    alignloop train "$method" --snapshot "$SNAPSHOTS" --out "$RUNS/$method" --generator "$GENERATOR" --no-progress --json
}

if [ "${1:-}" = "finetune-rank" ]; then
    finetune_rank
    exit
fi

mkdir -p "$SNAPSHOTS" "$RUNS"

# `alignloop nightly` will go here, replacing the three stages below: one command that snapshots, trains the reward
# model, fine-tunes with data parallelism over every GPU under torchrun, picks the best candidate by its evaluation
# and starts its canary (`alignloop rollout canary V --share 0.1 --why nightly`). Until it exists, candidates wait in
# the registry for a person (`alignloop adapters list`, then `alignloop rollout canary`).

# 1. Snapshot
alignloop feedback snapshot --out "$SNAPSHOTS" --no-progress
if ! compgen -G "$SNAPSHOTS/v*" > /dev/null; then
    echo "nightly: no events yet; nothing to train on"
    exit 0
fi

# 2. Reward model
alignloop train reward --snapshot "$SNAPSHOTS" --out "$RUNS/reward-$(date -u +%H%M%S)" "${CLIP_ARGS[@]}" --no-progress --json

# 3. Fine-tune, one method per GPU
torchrun --standalone --nnodes 1 --nproc-per-node "${NIGHTLY_GPUS:-1}" --no-python bash "$0" finetune-rank

alignloop adapters list
