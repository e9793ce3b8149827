#!/usr/bin/env python
"""Checks an environment built from the Dockerfile: the build runs it, and it runs by hand in any image.

    python tools/container_check.py [--torch-version VERSION]

Passes when megatron-core and Transformer Engine import, Transformer Engine's version lies in the range
megatron-core's own metadata declares for it (megatron-core 0.16.1: ``>=2.9.0a0,<2.12.0``), and, with
``--torch-version`` (the container's torch before this repository was installed), torch is still that version:
pip kept the container's build instead of fetching another. Prints one line per check; exits 1 if any fails.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import sys

from packaging.requirements import Requirement
from packaging.version import Version


def declared_te_range():
    """The ``transformer-engine`` specifier of megatron-core's metadata (its ``dev`` extra names it)."""
    for line in importlib.metadata.requires("megatron-core") or []:
        requirement = Requirement(line)
        if requirement.name == "transformer-engine":
            return requirement.specifier
    raise LookupError("megatron-core's metadata names no transformer-engine version")


def checks(torch_version: str | None) -> list[tuple[bool, str]]:
    """(passed, what) per check."""
    import torch

    found = []
    if torch_version is not None:
        found.append((torch.__version__ == torch_version, f"torch {torch.__version__} (the container's: {torch_version})"))
    try:
        import megatron.core  # noqa: F401

        found.append((True, f"megatron-core {importlib.metadata.version('megatron-core')} imports"))
    except ImportError as error:
        found.append((False, f"megatron-core does not import ({error})"))
        return found
    declared = declared_te_range()
    try:
        import transformer_engine  # noqa: F401

        te_version = importlib.metadata.version("transformer-engine")
    except (ImportError, OSError, importlib.metadata.PackageNotFoundError) as error:  # OSError: a missing library
        found.append((False, f"Transformer Engine is not installed or does not import ({error}); megatron-core "
                             f"declares {declared}"))
        return found
    inside = declared.contains(Version(te_version), prereleases=True)
    found.append((inside, f"Transformer Engine {te_version}, megatron-core declares {declared}"))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch-version", help="the torch version the container had before the install")
    args = parser.parse_args(argv)
    found = checks(args.torch_version)
    for passed, what in found:
        print(f"{'ok' if passed else 'FAILED'}: {what}")
    return 0 if all(passed for passed, _ in found) else 1


if __name__ == "__main__":
    sys.exit(main())
