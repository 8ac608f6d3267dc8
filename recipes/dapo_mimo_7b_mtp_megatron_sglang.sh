#!/usr/bin/env bash
# DAPO with joint MTP training of MiMo-7B-RL on 16 nodes x 8 GPUs: Megatron-core training (TP/PP/CP
# 2/2/2, offloaded), SGLang rollout (TP 4) drafting with the MTP layer (EAGLE), trunk and draft weights
# synced after every step and the draft's acceptance checked. The setup of verl's
# examples/mtp_trainer/test_dapo_mimo_7b_with_mtp_math_megatron.sh, with the same keys. Colocated, as
# there: the SGLang servers run on the training GPUs (128 in all) and sleep while the actor trains.
#
# Needs: the image of docker/Dockerfile on every node, a Ray cluster, MiMo-7B-RL under
# ${RAY_DATA_HOME}/models (config.json max_position_embeddings set to 32768), DAPO-Math-17k and
# AIME-2024 parquet under ${RAY_DATA_HOME}/data. Submit it (docs/cluster.md):
#   ray job submit --address http://HEAD_IP:8265 --runtime-env runtime_env.yaml \
#       -- bash recipes/dapo_mimo_7b_mtp_megatron_sglang.sh [more overrides]
# DRY_RUN=1 prints the overrides, one per line, instead of training.
set -euo pipefail

NNODES=${NNODES:-16}
NGPUS_PER_NODE=${NGPUS_PER_NODE:-8}
RAY_DATA_HOME=${RAY_DATA_HOME:-"${HOME}/verl"}
MODEL_PATH=${MODEL_PATH:-"${RAY_DATA_HOME}/models/MiMo-7B-RL"}
TRAIN_FILE=${TRAIN_FILE:-"${RAY_DATA_HOME}/data/dapo-math-17k.parquet"}
TEST_FILE=${TEST_FILE:-"${RAY_DATA_HOME}/data/aime-2024.parquet"}
project_name=${PROJECT_NAME:-DAPO}
exp_name=${EXP_NAME:-DAPO-mimo-7b-rl-megatron-mtp}
CKPTS_DIR=${CKPTS_DIR:-"${RAY_DATA_HOME}/ckpts/${project_name}/${exp_name}"}

max_prompt_length=$((1024 * 2))
max_response_length=$((1024 * 8))
overlong_buffer_len=$((1024 * 4))
train_prompt_bsz=128
train_prompt_mini_bsz=32
n_resp_per_prompt=16
gen_tp=4
train_tp=2
train_pp=2
train_cp=2
offload=True

# MTP speculation in rollout: the seed's SGLang EAGLE settings. MTP_ROLLOUT=False trains the MTP layer
# without drafting (verl's measurements found drafting slower on H20: measure before you choose).
MTP_ROLLOUT=${MTP_ROLLOUT:-True}
SPEC_ALGORITHM=${SPEC_ALGORITHM:-EAGLE}
SPEC_STEPS=${SPEC_STEPS:-2}
SPEC_TOPK=${SPEC_TOPK:-2}
SPEC_DRAFT_TOKENS=${SPEC_DRAFT_TOKENS:-4}

mtp_params=(
    actor_rollout_ref.model.mtp.enable=True
    actor_rollout_ref.model.mtp.enable_train=True
    actor_rollout_ref.model.mtp.mtp_loss_scaling_factor=0.1
    actor_rollout_ref.model.mtp.detach_encoder=True
    actor_rollout_ref.model.mtp.enable_rollout=${MTP_ROLLOUT}
    actor_rollout_ref.model.mtp.speculative_algorithm=${SPEC_ALGORITHM}
    actor_rollout_ref.model.mtp.speculative_num_steps=${SPEC_STEPS}
    actor_rollout_ref.model.mtp.speculative_eagle_topk=${SPEC_TOPK}
    actor_rollout_ref.model.mtp.speculative_num_draft_tokens=${SPEC_DRAFT_TOKENS}
)

# verl's script also sets actor.megatron.use_mbridge=True, rollout.disable_log_stats=False and
# trainer.log_val_generations=10: accepted here but not acted on (README, "Coming from verl"), so left out.
args=(
    data.train_files="${TRAIN_FILE}"
    data.val_files="${TEST_FILE}"
    data.prompt_key=prompt
    data.truncation=left
    data.max_prompt_length=${max_prompt_length}
    data.max_response_length=${max_response_length}
    data.train_batch_size=${train_prompt_bsz}
    data.trust_remote_code=True
    actor_rollout_ref.rollout.n=${n_resp_per_prompt}
    algorithm.adv_estimator=grpo
    algorithm.use_kl_in_reward=False
    algorithm.kl_ctrl.kl_coef=0.0
    actor_rollout_ref.actor.use_kl_loss=False
    actor_rollout_ref.actor.kl_loss_coef=0.0
    actor_rollout_ref.actor.clip_ratio_low=0.2
    actor_rollout_ref.actor.clip_ratio_high=0.28
    actor_rollout_ref.actor.clip_ratio_c=10.0
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4
    actor_rollout_ref.model.path="${MODEL_PATH}"
    actor_rollout_ref.model.trust_remote_code=True
    actor_rollout_ref.actor.optim.lr=1e-6
    actor_rollout_ref.actor.optim.lr_warmup_steps=10
    actor_rollout_ref.actor.optim.weight_decay=0.1
    actor_rollout_ref.actor.optim.clip_grad=1.0
    actor_rollout_ref.actor.ppo_mini_batch_size=${train_prompt_mini_bsz}
    actor_rollout_ref.actor.entropy_coeff=0
    actor_rollout_ref.actor.loss_agg_mode=token-mean
    actor_rollout_ref.actor.megatron.param_offload=${offload}
    actor_rollout_ref.actor.megatron.optimizer_offload=${offload}
    actor_rollout_ref.actor.megatron.grad_offload=${offload}
    actor_rollout_ref.actor.megatron.tensor_model_parallel_size=${train_tp}
    actor_rollout_ref.actor.megatron.pipeline_model_parallel_size=${train_pp}
    actor_rollout_ref.actor.megatron.context_parallel_size=${train_cp}
    actor_rollout_ref.ref.megatron.tensor_model_parallel_size=${train_tp}
    actor_rollout_ref.ref.megatron.pipeline_model_parallel_size=${train_pp}
    actor_rollout_ref.ref.megatron.context_parallel_size=${train_cp}
    actor_rollout_ref.ref.megatron.param_offload=${offload}
    actor_rollout_ref.rollout.name=sglang
    actor_rollout_ref.rollout.mode=server
    # colocated: every gen_tp consecutive actor ranks of a node start one SGLang server on their own GPUs
    # (one replica per gen_tp GPUs, no GPUs beyond the actor's), push the weights to it as CUDA IPC
    # handles, and the servers release their memory while the actor trains (free_cache_engine)
    actor_rollout_ref.hybrid_engine=True
    actor_rollout_ref.rollout.free_cache_engine=True
    actor_rollout_ref.rollout.server.num_replicas=$((NNODES * NGPUS_PER_NODE / gen_tp))
    # the driver reaches the replicas by node IP, so they listen on all interfaces: keep the cluster
    # network private
    actor_rollout_ref.rollout.server.host=0.0.0.0
    actor_rollout_ref.rollout.tensor_model_parallel_size=${gen_tp}
    actor_rollout_ref.rollout.gpu_memory_utilization=0.80
    actor_rollout_ref.rollout.enable_chunked_prefill=True
    actor_rollout_ref.rollout.max_num_batched_tokens=$((max_prompt_length + max_response_length))
    actor_rollout_ref.rollout.temperature=1.0
    actor_rollout_ref.rollout.top_p=1.0
    actor_rollout_ref.rollout.top_k=-1
    actor_rollout_ref.rollout.val_kwargs.temperature=1.0
    actor_rollout_ref.rollout.val_kwargs.top_p=0.7
    actor_rollout_ref.rollout.val_kwargs.top_k=-1
    actor_rollout_ref.rollout.val_kwargs.do_sample=True
    actor_rollout_ref.rollout.val_kwargs.n=1
    actor_rollout_ref.rollout.prometheus.enable=True
    actor_rollout_ref.rollout.prometheus.port=44398
    reward_model.reward_manager=dapo
    +reward_model.reward_kwargs.overlong_buffer_cfg.enable=True
    +reward_model.reward_kwargs.overlong_buffer_cfg.len=${overlong_buffer_len}
    +reward_model.reward_kwargs.overlong_buffer_cfg.penalty_factor=1.0
    +reward_model.reward_kwargs.overlong_buffer_cfg.log=False
    +reward_model.reward_kwargs.max_resp_len=${max_response_length}
    trainer.logger='["console","tensorboard"]'
    trainer.project_name="${project_name}"
    trainer.experiment_name="${exp_name}"
    trainer.nnodes=${NNODES}
    trainer.n_gpus_per_node=${NGPUS_PER_NODE}
    trainer.val_before_train=False
    trainer.test_freq=10
    trainer.save_freq=-1
    trainer.total_epochs=10
    trainer.total_training_steps=400
    trainer.resume_mode=auto
    trainer.default_local_dir="${CKPTS_DIR}"
    "${mtp_params[@]}"
)

if [[ "${DRY_RUN:-0}" == 1 ]]; then
    printf '%s\n' "${args[@]}" "$@"
    exit 0
fi
exec python3 -m verl_mtp.trainer.main_dapo --config-name=ppo_megatron_trainer.yaml "${args[@]}" "$@"
