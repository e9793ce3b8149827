#!/usr/bin/env python
"""``megatron-qwen preprocess`` from a checkout (megatron_qwen/cli/preprocess.py): ChatML conversations to a
Megatron SFT dataset."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
