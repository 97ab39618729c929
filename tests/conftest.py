import os
from pathlib import Path

import pytest
from tests.tiny_model import TINY

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
COURSE = Path(__file__).resolve().parents[2] / "shared" / "data" / "classical-chinese"


@pytest.fixture(scope="session")
def tiny():
    """(model fp32, model nf4, tokenizer) of the tiny test Llama."""
    from lib import models

    tok = models.load_tokenizer(TINY)
    return models.load_model(TINY, "none"), models.load_model(TINY, "nf4"), tok


@pytest.fixture(scope="session")
def sample_eval():
    from lib import data

    return data.load_split("data/sample", "public_test")
