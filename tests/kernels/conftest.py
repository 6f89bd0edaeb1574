"""Compiled-kernel tests: each test compiles from a clean torch.compile cache, so that code compiled
by an earlier test (other modules, other monkeypatched policies) is never reused."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_compile_cache():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
