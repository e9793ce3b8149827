"""``python -m megatron_qwen``: the ``megatron-qwen`` command, where its script is not on the PATH."""
import sys

from megatron_qwen.cli import main

if __name__ == "__main__":  # the guard matters: dist-checkpointing's writer re-imports the main module
    sys.exit(main())
