#!/usr/bin/env python
"""``megatron-qwen convert`` from a checkout (megatron_qwen/cli/convert.py): Qwen checkpoints between Hugging Face
and megatron-core."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli.convert import main  # noqa: E402

if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports this module
    sys.exit(main())
