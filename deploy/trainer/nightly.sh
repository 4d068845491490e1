#!/usr/bin/env bash
# The nightly learning run: `alignloop nightly` (trainer/nightly.py), run by the CronJob (deploy/k8s/trainer.yaml)
# and by the cron entry (deploy/cron/alignloop-nightly.cron). It snapshots the new feedback, retrains the reward model
# (gated), fine-tunes the live adapter, evaluates it against its parent, publishes a candidate and opens the canary.
# Its state (snapshots, per-stage results, the lock) lives under ALIGNLOOP_HOME/nightly: keep that folder from night
# to night, since a run that died is resumed from there and the snapshot's consumer offsets are committed for it.
# The registry, Kafka and the image store come from ALIGNLOOP_REGISTRY, ALIGNLOOP_KAFKA and ALIGNLOOP_IMAGE_STORE.
#
# The job itself is one process (its lock and state); with NIGHTLY_NPROC_PER_NODE > 1 its fine-tune stage runs
# `alignloop train METHOD` under torchrun, one process per GPU (data-parallel; not PPO).
#
# Settings (the CronJob sets them; the defaults are the command's):
#   NIGHTLY_METHOD          rwr | ppo | refl | kto (default refl, the fine-tuning benchmark's best)
#   NIGHTLY_CANARY_SHARE    share of users the candidate gets (default 0.1)
#   NIGHTLY_NPROC_PER_NODE  fine-tuning processes, one per GPU (default 1: one process, CUDA when there is one)
# Exit status: 0 done (or nothing new), 3 another run holds the lock, 2 a stage failed (the next run resumes it).
set -euo pipefail

exec alignloop nightly --method "${NIGHTLY_METHOD:-refl}" --canary-share "${NIGHTLY_CANARY_SHARE:-0.1}" \
    --nproc-per-node "${NIGHTLY_NPROC_PER_NODE:-1}" --no-progress --json
