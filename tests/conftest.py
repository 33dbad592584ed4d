import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from hetcomp.progress import set_quiet  # noqa: E402

set_quiet(True)


@pytest.fixture(scope="session")
def digits_model():
    """The trained digits CNN of the examples (weights cached under build/) and its loaders."""
    from digits_cnn import build

    return build()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
