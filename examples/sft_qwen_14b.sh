#!/usr/bin/env bash
# Supervised finetuning of Qwen-14B with the Qwen technical report's recipe (section 3.1.2), on 8 H100 80GB.
# The same file runs three ways:
#   bash examples/sft_qwen_14b.sh [flags]     torchrun, one process per GPU (GPUS_PER_NODE to change), one node;
#                                             or NNODES nodes: run it on each with NODE_RANK (0 to NNODES-1)
#                                             and the same MASTER_ADDR (node 0's address) and MASTER_PORT
#   sbatch examples/sft_qwen_14b.sh [flags]   SLURM: the batch script runs the launcher under srun, one task per GPU;
#                                             rank, world size and rendezvous come from SLURM's variables
#   srun ... examples/sft_qwen_14b.sh         inside an srun task: starts the trainer directly
# Extra flags override the recipe (qwen_14b_sft, shipped in megatron_qwen/recipes/; --recipe FILE replaces it), e.g.
# --train-steps 100 --rows pack, or --train-epochs 3 --warmup-fraction 0.1 to size the run by the data (the
# start line gives it in updates and epochs), or --save-interval-minutes 60 to add saves by the clock.
# Inputs (environment): DATA (the PREFIX megatron-qwen preprocess wrote), PRETRAINED (the output of
# megatron-qwen convert hf-to-mcore), SAVE_DIR (checkpoints; a rerun resumes from the latest one there),
# MEGATRON_QWEN (the command, default: megatron-qwen on the PATH).
#
# Default layout on 8 GPUs: tensor parallel 4 with sequence parallelism, data parallel 2, distributed optimizer.
# Memory per GPU (14.17B parameters, 3.54B per tensor-parallel rank):
#   bf16 weights                              2 B x 3.54B                                  =  7.1 GB
#   fp32 gradient buffer                      4 B x 3.54B                                  = 14.2 GB
#   Adam: fp32 main weights + 2 moments      12 B x 3.54B / 2 data-parallel ranks          = 21.3 GB
#   activations, selective recompute + SP     2048 x 5120 x 34 B / 4 per layer x 40 layers =  3.6 GB
#   logits and loss (vocab split over TP)     2048 x 152064 / 4 x 6 B                      =  0.5 GB
#   total ~47 GB, plus CUDA context, NCCL and allocator slack: ~55 GB of 80 GB.
# Tensor parallel 2 (data parallel 4) would need 14.2 + 28.3 + 21.3 + 7.1 + 0.9 = ~72 GB before any slack,
# too close to 80 GB; see docs/launching.md for 16 and 32 GPUs.
#
# Preemption: SLURM sends SIGUSR1 to the batch script 10 minutes before the time limit; the script passes it
# on to the trainer (srun forwards it to every task), which finishes its step, saves (weights 28 GB + optimizer
# 170 GB, a few minutes even on a slow shared file system) and exits; the script then requeues the job
# (`scontrol requeue`, allowed by --requeue), which resumes from that checkpoint when it starts again. Without
# SLURM, SIGTERM or SIGUSR1 to this script (e.g. a pod's termination notice) saves and stops the same way; rerun
# to resume. A signal that comes while the trainers are still starting stops them before any update.
#SBATCH --job-name=sft-qwen-14b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=sft-qwen-14b-%j.out
set -euo pipefail

REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# under sbatch, SLURM runs a copy of this file from its spool directory: SLURM_SUBMIT_DIR is the repository
if [[ ! -f "$REPO/examples/launch_sft.sh" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then REPO="$SLURM_SUBMIT_DIR"; fi

export DATA="${DATA:-data/sft_chatml}"
export PRETRAINED="${PRETRAINED:-checkpoints/qwen-14b-mcore}"
export SAVE_DIR="${SAVE_DIR:-checkpoints/qwen-14b-sft}"
# the SLURM/torchrun handling (and the signals above) is the shared launcher's; exec keeps this process's id,
# which SLURM's time-limit warning is sent to
exec bash "$REPO/examples/launch_sft.sh" --recipe qwen_14b_sft "$@"
