"""Shared test set-up: every test runs on CPU, seeded, on one thread.

Tests that read the real benchmark files use the `shared_data` fixture, which skips with a reason when
../shared/data is absent (a fresh clone of the project has no ../shared). Tests with the real Qwen2.5
configuration and tokenizer use `qwen_files` (../shared/models/qwen2.5-0.5b-instruct, no weights), which
skips the same way.
"""
import os
import random
import sys
from pathlib import Path

import pytest

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")          # keep the suite on CPU even on a GPU box
os.environ.setdefault("HF_HUB_OFFLINE", "1")               # never reach for the Hub from a test
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"
SHARED_QWEN = ROOT.parent / "shared" / "models" / "qwen2.5-0.5b-instruct"


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path to ../shared/data; skips the test when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real benchmark files not found at {SHARED_DATA} (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def qwen_files():
    """Path to ../shared/models/qwen2.5-0.5b-instruct (the real Qwen2.5 configuration, generation config,
    tokenizer and chat template; no weights); skips the test when the folder is not beside the checkout."""
    if not (SHARED_QWEN / "config.json").is_file():
        pytest.skip(f"real Qwen2.5 configuration and tokenizer not found at {SHARED_QWEN} "
                    "(only present on the project's machines)")
    return SHARED_QWEN


def pytest_configure(config):
    torch.set_num_threads(1)          # tiny tensors: one thread avoids contention overhead
