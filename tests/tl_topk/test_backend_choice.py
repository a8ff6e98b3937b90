"""Which backend a call runs: ``backend=`` > ``tl_topk.ops.use_backend`` > ``TL_TOPK_BACKEND`` > auto.

The backends' outputs are compared with the dense oracle elsewhere (test_backends.py); here the
oracle is the dispatch itself: spies on the pure backend functions record which one ran.
"""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

import tl_plugins
import tl_topk
from tl_plugins.cli import build_cli
from tl_topk.ops import attention as attention_module
from tl_topk.ops.backend import BACKENDS, requested_backend, use_backend

ACCEPTED = "accepted: auto, dense, chunked, cpp, triton, flex"


@pytest.fixture
def ran(monkeypatch):
    """The list of backends that ran, in order (spies around the dense and chunked functions)."""
    calls: list[str] = []
    for name, attr in (("dense", "dense_topk_attention"), ("chunked", "chunked_topk_attention")):
        real = getattr(attention_module, attr)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(attention_module, attr, spy)
    return calls


def _qkv(seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, 10, 2, 4, generator=g) for _ in range(3))


def test_precedence_argument_then_context_then_env_then_auto(monkeypatch):
    assert requested_backend() == "auto"
    assert requested_backend("auto") == "auto"
    monkeypatch.setenv("TL_TOPK_BACKEND", "flex")
    assert requested_backend() == "flex"
    with use_backend("chunked"):
        assert requested_backend() == "chunked"
        assert requested_backend("auto") == "chunked"
        assert requested_backend("dense") == "dense"
    assert requested_backend("triton") == "triton"
    assert requested_backend() == "flex"


def test_dispatch_follows_the_precedence(monkeypatch, ran):
    q, k, v = _qkv()
    ref = tl_topk.topk_attention(q, k, v, 3, causal=True, backend="dense")
    assert ran == ["dense"]
    ran.clear()
    # auto on CPU takes dense for these small score matrices; the context manager overrides it
    with use_backend("chunked"):
        out = tl_topk.topk_attention(q, k, v, 3, causal=True)
        tl_topk.topk_attention(q, k, v, 3, causal=True, backend="dense")  # the argument wins
    assert ran == ["chunked", "dense"]
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    ran.clear()
    monkeypatch.setenv("TL_TOPK_BACKEND", "chunked")
    tl_topk.topk_attention(q, k, v, 3, causal=True)
    with use_backend("dense"):
        tl_topk.topk_attention(q, k, v, 3, causal=True)  # the block beats the environment
    tl_topk.topk_attention(q, k, v, 3, causal=True, backend="dense")  # and so does the argument
    assert ran == ["chunked", "dense", "dense"]


def test_blocks_nest_and_restore_on_exit_and_on_exception():
    with use_backend("dense"):
        with use_backend("chunked"):
            assert requested_backend() == "chunked"
            with use_backend("auto"):  # hands the choice back to the environment / the automatic pick
                assert requested_backend() == "auto"
            assert requested_backend() == "chunked"
        assert requested_backend() == "dense"
        with pytest.raises(RuntimeError, match="boom"):
            with use_backend("flex"):
                assert requested_backend() == "flex"
                raise RuntimeError("boom")
        assert requested_backend() == "dense"
    assert requested_backend() == "auto"


@pytest.mark.parametrize("bad", ["flash", "Dense", "", None, 3])
def test_bad_names_are_refused_naming_argument_value_and_accepted(bad):
    body_ran = False
    with pytest.raises(ValueError) as info:
        with use_backend(bad):
            body_ran = True
    assert not body_ran
    assert str(info.value) == f"backend: got {bad!r}; {ACCEPTED}"
    q = torch.randn(1, 3, 1, 2)
    with pytest.raises(ValueError, match=f"^{re.escape(str(info.value))}$"):
        tl_topk.topk_attention(q, q, q, 1, causal=True, backend=bad)
    with pytest.raises(ValueError, match=f"^{re.escape(str(info.value))}$"):
        tl_topk.TopKConfig(k=2, backend=bad)


def test_env_var_is_read_at_each_call_normalised_and_checked(monkeypatch, ran):
    q, k, v = _qkv(1)
    monkeypatch.setenv("TL_TOPK_BACKEND", "  Chunked ")
    tl_topk.topk_attention(q, k, v, 3, causal=True)
    monkeypatch.setenv("TL_TOPK_BACKEND", "")  # empty = unset: auto (dense here)
    tl_topk.topk_attention(q, k, v, 3, causal=True)
    assert ran == ["chunked", "dense"]
    monkeypatch.setenv("TL_TOPK_BACKEND", "bogus")
    with pytest.raises(ValueError, match=f"^TL_TOPK_BACKEND: got 'bogus'; {ACCEPTED}$"):
        tl_topk.topk_attention(q, k, v, 3, causal=True)
    # an explicit choice does not consult the environment
    tl_topk.topk_attention(q, k, v, 3, causal=True, backend="chunked")
    with use_backend("dense"):
        tl_topk.topk_attention(q, k, v, 3, causal=True)
    assert ran == ["chunked", "dense", "chunked", "dense"]


def test_model_calls_follow_the_precedence(gpt2, tokens, monkeypatch, ran):
    """A model's attention call settles its backend like the functional op; ``backend="dense"``
    (from any level) takes the hooked route, where neither spied function runs."""
    plain = gpt2(tokens)
    tl_plugins.enable(gpt2, "topk", k=2)
    auto = gpt2(tokens)
    assert ran and set(ran) == {"dense"}  # auto: small score matrices on CPU
    ran.clear()
    with use_backend("chunked"):
        chunked = gpt2(tokens)
    assert ran and set(ran) == {"chunked"}
    torch.testing.assert_close(chunked, auto, atol=1e-5, rtol=0)
    assert not torch.allclose(auto, plain, atol=1e-3)  # top-k changed the model
    ran.clear()
    monkeypatch.setenv("TL_TOPK_BACKEND", "dense")
    hooked = gpt2(tokens)
    assert ran == []  # the hooked route
    torch.testing.assert_close(hooked, auto, atol=1e-5, rtol=0)
    tl_plugins.disable(gpt2, "topk")
    tl_plugins.enable(gpt2, "topk", k=2, backend="chunked")  # explicit beats env and block
    with use_backend("dense"):
        gpt2(tokens)
    assert ran and set(ran) == {"chunked"}
    tl_plugins.disable(gpt2, "topk")


def test_cli_backends_echoes_the_env_var_and_refuses_a_bad_one(monkeypatch):
    cli = build_cli()
    r = CliRunner().invoke(cli, ["topk", "backends"])
    assert r.exit_code == 0 and "TL_TOPK_BACKEND=(unset)" in r.output
    monkeypatch.setenv("TL_TOPK_BACKEND", " Flex")
    r = CliRunner().invoke(cli, ["topk", "backends"])
    assert r.exit_code == 0 and "TL_TOPK_BACKEND=flex" in r.output
    monkeypatch.setenv("TL_TOPK_BACKEND", "bogus")
    r = CliRunner().invoke(cli, ["topk", "backends"])
    assert r.exit_code == 2 and "TL_TOPK_BACKEND: got 'bogus'" in r.output


def test_backends_tuple_is_the_accepted_list():
    assert BACKENDS == tuple(ACCEPTED.removeprefix("accepted: ").split(", "))
    assert tl_topk.BACKENDS is BACKENDS
