#!/usr/bin/env bash
# The CPU quickstart as its separate stages, each a verl-mtp command (the same stages, settings and
# run-folder layout as `verl-mtp quickstart`, which chains them in one process):
#   data -> tokenizer -> sft (K=2 MTP layers) -> dapo (MTP trained) -> dapo control (MTP frozen) -> eval
#
#   bash recipes/quickstart_cpu.sh [RL overrides ...]          # run folder: runs/quickstart_cpu
#   RUN=runs/qs2 RL_STEPS=80 TEACHER_SLIP=0.5 SFT_STEPS=4000 SEED=0 bash recipes/quickstart_cpu.sh
#
# Re-running resumes: finished stages are skipped, a stopped SFT or RL run continues from its last
# checkpoint. Trailing KEY=VALUE arguments are Hydra overrides for both RL runs. The RL stage alone is
# `verl-mtp dapo --config-name=quickstart_rl ...` (verl_mtp/config/quickstart_rl.yaml).
# DRY_RUN=1 prints the commands, one per line, instead of running them.
set -euo pipefail

RUN=${RUN:-runs/quickstart_cpu}
SEED=${SEED:-0}
RL_STEPS=${RL_STEPS:-40}
SFT_STEPS=${SFT_STEPS:-4000}
TEACHER_SLIP=${TEACHER_SLIP:-0.5}
EVAL_LIMIT=${EVAL_LIMIT:-512}

run() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%s\n' "$*"
    else
        echo "[quickstart_cpu] $*" >&2
        "$@"
    fi
}

rl() {  # rl NAME ENABLE_TRAIN [overrides...]: one DAPO run; its event files stay in the run folder
    local name=$1 train=$2
    shift 2
    [[ -f "$RUN/$name/ckpt/global_step_$RL_STEPS/actor/model.safetensors" ]] && return 0
    TENSORBOARD_DIR="$RUN/$name/tensorboard" run verl-mtp dapo --config-name=quickstart_rl \
        actor_rollout_ref.model.path="$RUN/sft" \
        data.train_files="$RUN/data/train.parquet" data.val_files="$RUN/data/test.parquet" \
        trainer.total_training_steps="$RL_STEPS" trainer.seed="$SEED" \
        trainer.log_dir="$RUN/$name" trainer.default_local_dir="$RUN/$name/ckpt" \
        trainer.experiment_name="quickstart_$name" \
        actor_rollout_ref.model.mtp.enable_train="$train" "$@"
}

[[ -f "$RUN/data/sft.jsonl" ]] || run verl-mtp data "$RUN/data" --n-train 8192 --n-test 512 --n-sft 20000 \
    --seed "$SEED" --teacher-slip "$TEACHER_SLIP"
[[ -f "$RUN/tokenizer/tokenizer.json" ]] || run verl-mtp tokenizer "$RUN/tokenizer" --n-problems 20000 --seed 0
# nothing else runs during SFT or RL, so each takes both cores (the RL workers read VERL_MTP_THREADS)
export VERL_MTP_THREADS="${VERL_MTP_THREADS:-2}"
[[ -f "$RUN/sft/model.safetensors" ]] || run verl-mtp sft --data "$RUN/data/sft.jsonl" --out "$RUN/sft" \
    --tokenizer "$RUN/tokenizer" --test-data none --steps "$SFT_STEPS" --seed "$SEED" --threads 2
rl rl true "$@"
rl rl_control false "$@"
run verl-mtp eval --tokenizer "$RUN/tokenizer" --test "$RUN/data/test.parquet" --out "$RUN/report" \
    --limit "$EVAL_LIMIT" --run rl="$RUN/rl" --run rl_control="$RUN/rl_control" \
    sft="$RUN/sft" rl="$RUN/rl/ckpt/global_step_$RL_STEPS/actor" \
    rl_control="$RUN/rl_control/ckpt/global_step_$RL_STEPS/actor"
