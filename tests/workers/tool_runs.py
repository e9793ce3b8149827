"""Runs several command lines of the tools in tools/ in one process (each process pays seconds of imports).

Usage: tool_runs.py COMMANDS.json, a JSON list of command lines ``[TOOL, ARG, ...]``, where TOOL names a
script in tools/ (``convert_checkpoint``, ``preprocess_chatml``) whose ``main(argv)`` runs ARG...; stops
at the first failure.
"""
import importlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def main() -> int:
    for tool, *argv in json.loads(Path(sys.argv[1]).read_text()):
        status = importlib.import_module(tool).main(argv)
        if status != 0:
            print(f"{tool}.py {' '.join(argv)} exited with {status}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
