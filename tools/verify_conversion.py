#!/usr/bin/env python
"""``megatron-qwen verify`` from a checkout (megatron_qwen/cli/verify.py): the same prompts through transformers and
megatron-core at a TP/PP layout."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli.verify import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: dist-checkpointing re-imports this module
    sys.exit(main())
