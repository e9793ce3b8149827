#!/usr/bin/env bash
# Full-parameter supervised finetuning of Qwen3-30B-A3B (a mixture of experts) with the seed recipe's optimizer
# settings (qwen_14b_sft's; dropout 0, as Qwen3's config.json), on 2 nodes of 8 H100 80GB. It runs the ways
# sft_qwen_14b.sh does, which says how:
#   sbatch examples/sft_qwen3_30b_a3b.sh [flags]                 SLURM, 2 nodes (one task per GPU)
#   NNODES=2 NODE_RANK=0|1 MASTER_ADDR=node0 bash examples/sft_qwen3_30b_a3b.sh [flags]   torchrun on each node
# Extra flags override the recipe (qwen3_30b_a3b_sft, shipped in megatron_qwen/recipes/), e.g. --train-steps 100.
# Inputs (environment): DATA, PRETRAINED (megatron-qwen convert hf-to-mcore of Qwen3-30B-A3B), SAVE_DIR,
# MEGATRON_QWEN, as for sft_qwen_14b.sh; SIGTERM, SIGUSR1 and SLURM's time-limit warning save and stop the same way.
#
# Layout on 16 GPUs: pipeline parallel 2 across the nodes (24 layers each), expert parallel 8 inside each node
# (16 of the 128 experts per GPU; the experts' all-to-all stays on NVLink), tensor parallel 1 (attention is
# small: hidden 2048), data parallel 8 for the dense parameters, expert data parallel 16 / (EP 8 x PP 2) = 1.
# Parameters: 28.99B in experts (48 layers x 128 x 3 x 2048 x 768), 1.54B dense (attention 0.91B, embedding
# and output layer 0.31B each, routers 0.01B). Per GPU of the first stage: 1.81B expert (16 experts x 24 layers)
# and 0.77B dense (24 layers' attention and routers, the embedding) parameters, 2.58B in all:
#   bf16 weights                              2 B x 2.58B                                       =  5.2 GB
#   fp32 gradient buffer                      4 B x 2.58B                                       = 10.3 GB
#   Adam, experts: fp32 main weights + 2 moments   12 B x 1.81B / 1 expert-data-parallel rank   = 21.7 GB
#   Adam, dense                               12 B x 0.77B / 8 data-parallel ranks              =  1.2 GB
#   activations, selective recompute          per token and layer ~35 KB for attention (norm and projection
#                                             inputs, q/k/v, attention output) + ~109 KB for the experts
#                                             (8 routed copies of each token: fc1 input 32 KB, fc1 output
#                                             24 KB, SwiGLU output 12 KB, fc2 output 32 KB; norm, router):
#                                             2048 x 145 KB x 24 layers x 2 micro-batches in flight
#                                             (1F1B: the first stage holds PP of them)           = 14.3 GB
#   logits and loss (last stage only)         one 256 MB float32 block of the output layer     =  0.3 GB
#   total ~53 GB, plus CUDA context, NCCL, allocator slack and routing imbalance (an EP rank whose experts get
#   twice their share of tokens holds ~5 GB more): ~62 GB of 80 GB.
# One node cannot hold it at any layout: the experts' state alone is 28.99B x 18 B / 8 GPUs = 65 GB per GPU,
# before the dense parameters and activations (EP 8 on 8 GPUs: 65.2 + 11.6 + 14.3 = ~91 GB). docs/launching.md
# compares EP 16 on 16 GPUs and 32 GPUs.
#
# Preemption: a save writes weights 61 GB + optimizer 366 GB (fp32 main weights and moments of 30.5B).
#SBATCH --job-name=sft-qwen3-30b-a3b
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --output=sft-qwen3-30b-a3b-%j.out
set -euo pipefail

REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# under sbatch, SLURM runs a copy of this file from its spool directory: SLURM_SUBMIT_DIR is the repository
if [[ ! -f "$REPO/examples/launch_sft.sh" && -n "${SLURM_SUBMIT_DIR:-}" ]]; then REPO="$SLURM_SUBMIT_DIR"; fi

export DATA="${DATA:-data/sft_chatml}"
export PRETRAINED="${PRETRAINED:-checkpoints/qwen3-30b-a3b-mcore}"
export SAVE_DIR="${SAVE_DIR:-checkpoints/qwen3-30b-a3b-sft}"
exec bash "$REPO/examples/launch_sft.sh" --recipe qwen3_30b_a3b_sft "$@"
