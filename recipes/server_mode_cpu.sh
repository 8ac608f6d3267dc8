#!/usr/bin/env bash
# DAPO on a CPU box through rollout.mode=server, split (hybrid_engine=False): the HTTP path served by the
# native engine. Two rollout replicas (separate processes, 127.0.0.1 only) draft with the policy's MTP
# layer; after each step the trainer pushes trunk + MTP weights through /update_weights_from_tensor,
# compares every replica's checksum with what it sent, and the stale-draft guard judges the next batch.
# (The cluster recipe's colocated server mode, replicas started by the actor ranks, is
# hybrid_engine=True: see docs/cluster.md.)
#
#   bash recipes/server_mode_cpu.sh [more overrides]       # run folder: runs/server_mode_cpu
#
# To poke at one replica by hand instead (same flags SGLang takes):
#   python -m verl_mtp.rollout.server --model-path DIR --port 30000 --speculative-algorithm EAGLE
#   curl -s localhost:30000/generate -d '{"input_ids": [[1, 2, 3]], "return_logprob": true,
#        "sampling_params": {"max_new_tokens": 16, "temperature": 0}}'
# DRY_RUN=1 prints the overrides, one per line, instead of training.
set -euo pipefail

args=(
    trainer.device=cpu
    trainer.project_name=verl_mtp
    trainer.experiment_name=server_mode_cpu
    trainer.log_dir=runs/server_mode_cpu
    trainer.default_local_dir=runs/server_mode_cpu/checkpoints
    trainer.total_training_steps=${STEPS:-4}
    trainer.logger='["console","jsonl"]'
    actor_rollout_ref.rollout.mode=server
    actor_rollout_ref.hybrid_engine=False
    actor_rollout_ref.rollout.server.num_replicas=2
    actor_rollout_ref.rollout.server.host=127.0.0.1
    actor_rollout_ref.rollout.server.base_port=${BASE_PORT:-30000}
    actor_rollout_ref.model.mtp.enable=True
    actor_rollout_ref.model.mtp.enable_rollout=True
    actor_rollout_ref.model.mtp.speculative_algorithm=EAGLE
    actor_rollout_ref.model.mtp.speculative_num_steps=auto
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${args[@]}" "$@"
    exit 0
fi
exec python -m verl_mtp.trainer.main_dapo "${args[@]}" "$@"
