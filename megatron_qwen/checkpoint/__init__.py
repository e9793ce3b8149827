"""Checkpoints: the iteration directory layout shared by the converter and the trainer
(``layout``), and the bridge between Hugging Face Qwen checkpoints and megatron-core
(``hf_io`` reads and writes the files, ``hf_qwen1``/``hf_qwen2`` map the tensors, ``fused``
knows how megatron-core fuses them, ``hf_chat`` writes what a served chat model needs,
``convert`` and ``verify`` drive the tools).
"""
