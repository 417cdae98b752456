import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
