"""Runs several ``tools/convert_checkpoint.py`` command lines in one process (imports cost seconds).

Usage: convert_cli_runs.py COMMANDS.json, a JSON list of argument lists; stops at the first failure.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))


def main() -> int:
    import convert_checkpoint

    for argv in json.loads(Path(sys.argv[1]).read_text()):
        status = convert_checkpoint.main(argv)
        if status != 0:
            print(f"convert_checkpoint.py {' '.join(argv)} exited with {status}", file=sys.stderr)
            return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
