#!/usr/bin/env python
"""``megatron-qwen inspect`` from a checkout (megatron_qwen/cli/inspect_dataset.py): a preprocessed conversation
with its supervised tokens marked."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli.inspect_dataset import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
