"""megatron_qwen: supervised finetuning of Qwen chat models on megatron-core.

Subpackages, one concern each: ``data`` (conversations to indexed datasets: ChatML rendering, loss masks,
tokenizers), ``batching`` (datasets to each update's batches), ``models`` (Qwen presets, megatron-core layer specs
and a rank's model chunks), ``checkpoint`` (the checkpoint layout, Hugging Face <-> megatron-core), ``training`` (the
SFT loop) and ``platform`` (CPU mode, distributed start-up, fault injection); ``config`` is the run's configuration
as plain data, and ``train`` the entry point.
"""
