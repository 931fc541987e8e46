from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import settings

VECTORS = Path(__file__).resolve().parent.parent / "protocol" / "vectors"

settings.register_profile("ci", max_examples=60, deadline=None)
settings.register_profile("stress", max_examples=2000, deadline=None)
settings.load_profile("stress" if os.environ.get("QKDD_STRESS") else "ci")

STRESS = bool(os.environ.get("QKDD_STRESS"))


def load_vectors(name: str) -> Any:
    return json.loads((VECTORS / f"{name}.json").read_text())


def hex_bits(text: str, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8), count=count)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(12345)
