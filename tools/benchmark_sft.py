#!/usr/bin/env python
"""``megatron-qwen benchmark`` from a checkout (megatron_qwen/cli/benchmark.py): training throughput of the SFT
trainer against the plain transformers loop."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli.benchmark import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    sys.exit(main())
