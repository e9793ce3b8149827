#!/usr/bin/env bash
# The launcher the SFT examples (sft_qwen_14b.sh, sft_qwen3_30b_a3b.sh) exec once they have set their SLURM
# request and defaults: `bash examples/launch_sft.sh --recipe NAME [flags]` starts `megatron-qwen train` with
# those flags after --data-path "$DATA" --pretrained-checkpoint "$PRETRAINED" --save-dir "$SAVE_DIR", in one of
# three ways:
#   in the batch script of a SLURM job   re-runs itself under srun, one task per GPU (the environment goes along),
#                                        passes the time-limit warning on and requeues the job after the save;
#   inside an srun task                  starts the trainer directly (it reads SLURM's rank variables);
#   otherwise                            torchrun, GPUS_PER_NODE processes per node (default: one per GPU), one node
#                                        or NNODES nodes (NODE_RANK, MASTER_ADDR, MASTER_PORT on each).
# The examples' header comments say what each way does on SIGTERM and SIGUSR1.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

: "${DATA:?set DATA to the PREFIX megatron-qwen preprocess wrote}"
: "${PRETRAINED:?set PRETRAINED to the output of megatron-qwen convert hf-to-mcore}"
: "${SAVE_DIR:?set SAVE_DIR to the checkpoint folder}"
MEGATRON_QWEN="${MEGATRON_QWEN:-megatron-qwen}"
export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron's overlap of TP communication with compute expects it
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

TRAIN=("$MEGATRON_QWEN" train
  --data-path "$DATA"
  --pretrained-checkpoint "$PRETRAINED"
  --save-dir "$SAVE_DIR"
  "$@")

# The exit status of background process $1. Its `wait` returns early whenever a trap fires: wait again until the
# process has really ended.
wait_through_traps() {
  while kill -0 "$1" 2>/dev/null; do wait "$1" || true; done
  wait "$1"
}

# SLURM_STEP_ID is unset or 4294967294 (SLURM's id of the batch step) in the batch script, a step number in srun
if [[ -n "${SLURM_STEP_ID:-}" && "${SLURM_STEP_ID}" != "4294967294" && "${SLURM_STEP_ID}" != "batch" ]]; then
  # one task of an srun step: the trainer reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID / SLURM_NODELIST
  export MASTER_PORT="${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"
  exec "${TRAIN[@]}"
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  # the batch script: one task per GPU on every node, each running this file again. srun runs in the
  # background so that the USR1 trap fires at once (bash defers traps while a foreground command runs).
  preempted=0
  step=""
  trap 'preempted=1; if [[ -n $step ]]; then kill -USR1 "$step" 2>/dev/null || true; fi' USR1
  export DATA PRETRAINED SAVE_DIR MEGATRON_QWEN
  srun --kill-on-bad-exit=1 --cpu-bind=none bash "$REPO/examples/launch_sft.sh" "$@" &
  step=$!
  status=0
  wait_through_traps "$step" || status=$?
  if [[ $preempted == 1 && $status == 0 ]]; then
    echo "stopped cleanly after the time-limit warning; requeueing job $SLURM_JOB_ID to resume from its checkpoint"
    scontrol requeue "$SLURM_JOB_ID" || echo "scontrol requeue failed: submit the same job again to resume" >&2
  fi
  exit "$status"
else
  # torchrun passes a SIGTERM on to the trainers but kills them 30 seconds later (the releases before
  # --shutdown-timeout always do), too soon for a large save. So this script takes SIGTERM and SIGUSR1 itself and
  # sends SIGUSR1 to the trainer processes alone (torchrun's children): they save and exit 0, and torchrun with
  # them. Before the trainers exist, torchrun itself gets the SIGTERM: nothing has trained yet.
  launcher=""
  trap 'if [[ -n $launcher ]]; then pkill -USR1 -P "$launcher" || kill -TERM "$launcher" 2>/dev/null || true; fi' \
    TERM USR1
  if [[ ${NNODES:-1} -gt 1 ]]; then
    nodes=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK (0 to NNODES-1) on each node}"
      --master-addr "${MASTER_ADDR:?set MASTER_ADDR to the address of node 0 on every node}"
      --master-port "${MASTER_PORT:-29500}")
  else
    nodes=(--standalone)
  fi
  torchrun "${nodes[@]}" --nproc-per-node "${GPUS_PER_NODE:-gpu}" --no-python "${TRAIN[@]}" &
  launcher=$!
  wait_through_traps "$launcher" || exit $?
fi
