"""tools/container_check.py, the check the Dockerfile's build runs: Transformer Engine's version against the range
megatron-core's own metadata declares, and a failure (not a pass) where TE is missing, as on this CPU machine."""
import importlib.util
import sys

import pytest
from packaging.version import Version

from workers import REPO

sys.path.insert(0, str(REPO / "tools"))
import container_check  # noqa: E402


@pytest.mark.parametrize("version, fits", [
    ("2.2.0", False),  # NGC PyTorch 25.04's, the Dockerfile's default before
    ("2.9.0+70f5366", True),  # a local build as NGC containers carry it
    ("2.11.0", True),
    ("2.12.0", False),
])
def test_megatron_cores_declared_transformer_engine_range(version, fits):
    assert container_check.declared_te_range().contains(Version(version), prereleases=True) == fits


def test_the_check_names_transformer_engine_and_fails_without_it(capsys):
    import torch

    status = container_check.main(["--torch-version", torch.__version__])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ok: torch {torch.__version__} (the container's: {torch.__version__})"
    if importlib.util.find_spec("transformer_engine") is None:  # this project's CPU machines
        assert status == 1
        assert lines[-1].startswith("FAILED: Transformer Engine is not installed")
    else:
        assert lines[-1].split(": ")[1].startswith("Transformer Engine ")
