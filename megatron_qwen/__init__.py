"""megatron_qwen: supervised finetuning of Qwen chat models on megatron-core.

Subpackages, one concern each: ``data`` (ChatML rendering, loss masks, tokenizers, indexed datasets),
``models`` (Qwen presets and megatron-core layer specs), ``checkpoint`` (Hugging Face <-> megatron-core),
``training`` (the SFT loop) and ``platform`` (CPU mode, distributed start-up).
"""
