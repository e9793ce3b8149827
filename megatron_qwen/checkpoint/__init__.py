"""Checkpoints: the iteration directory layout shared by the converter and the trainer
(``layout``), and the bridge between Hugging Face Qwen checkpoints and megatron-core: ``hf_io``
reads and writes the files, ``mapping`` walks a mapping table that ``hf_qwen1``/``hf_qwen2`` list,
``fused`` knows how megatron-core fuses projections, ``hf_chat`` writes what a served chat model
needs, and ``convert`` and ``verify`` drive the two tools.
"""
