"""Shared fixtures for tl_iclgd tests: tiny random models (fast) and the real SmolLM2 (slow, session)."""

import pytest
import torch

from tl_iclgd.tasks import TokenizedTask
from tl_iclgd.threads import torch_threads
from tl_plugins.models import tiny


@pytest.fixture(scope="module")
def llama3():
    """3-layer Llama-like model: grouped-query attention (K/V live in _W_K/_W_V), rotary, RMSNorm."""
    return tiny.build(tiny.TINY_LLAMA, n_layers=3, seed=1)


@pytest.fixture(scope="module")
def gpt3():
    """3-layer GPT-2-like model: LayerNorm, learned positions, biases."""
    return tiny.build(tiny.TINY_GPT2, n_layers=3, seed=2)


def id_task(d_vocab: int = 90, n_demos: int = 4, n_queries: int = 6, seed: int = 0) -> TokenizedTask:
    """A token-copy task on raw ids (x, 3) -> x with prompts of varying length."""
    g = torch.Generator().manual_seed(seed)

    def pair(i):
        n = 1 + i % 3
        x = torch.randint(10, d_vocab, (n,), generator=g).tolist()
        return (x + [3], [x[-1]])
    return TokenizedTask.from_ids([pair(i) for i in range(n_demos)], [pair(i) for i in range(n_queries)])


@pytest.fixture(scope="session")
def smollm2():
    from tl_plugins.models import load

    return load("smollm2-135m")


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: much faster than two on the shared 2-core test machine."""
    with torch_threads(1):
        yield


@pytest.fixture
def make_task():
    """The factory :func:`id_task` (test folders have no __init__.py, so tests take it as a fixture)."""
    return id_task
