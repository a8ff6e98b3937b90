"""The public tensor APIs of tl_topk carry jaxtyping shapes named as TransformerLens names them.

The oracle is TransformerLens's own annotations (``GroupedQueryAttention.calculate_attention_scores``
and ``AbstractAttention.calculate_z_scores``): q, k and the pattern use its dimension names; v and z
keep their own last dimension ``d_v`` (top-k attention allows d_v != d_head).
"""

from __future__ import annotations

import typing

import pytest

from tl_topk.ops import attention, dense, feedforward, flex, mixed, sdpa, triton_backend


def _dim_str(hint):
    """The jaxtyping shape of ``hint``, looking inside ``Optional[...]``."""
    if hasattr(hint, "dim_str"):
        return hint.dim_str
    inner = [a for a in typing.get_args(hint) if hasattr(a, "dim_str")]
    return inner[0].dim_str if len(inner) == 1 else None


def _dims(fn) -> dict[str, str]:
    return {name: _dim_str(hint) for name, hint in typing.get_type_hints(fn).items()}


def _tl_dims() -> dict[str, str]:
    gqa = pytest.importorskip("transformer_lens.components.grouped_query_attention")
    abstract = pytest.importorskip("transformer_lens.components.abstract_attention")
    scores = _dims(gqa.GroupedQueryAttention.calculate_attention_scores)
    z = _dims(abstract.AbstractAttention.calculate_z_scores)
    return {"q": scores["q"], "k": scores["k"], "pattern": z["pattern"], "z": z["return"]}


ATTENTION_FNS = [attention.topk_attention, dense.dense_topk_attention, flex.flex_topk_attention,
                 triton_backend.triton_topk_attention, mixed.full_attention, mixed.mixed_heads_attention,
                 sdpa.sdpa_attention]


@pytest.mark.parametrize("fn", ATTENTION_FNS, ids=lambda f: f.__name__)
def test_attention_apis_use_transformerlens_dimension_names(fn):
    tl = _tl_dims()
    dims = _dims(fn)
    assert dims["q"] == tl["q"]
    assert dims["k"] == tl["k"]
    assert dims["v"] == tl["k"].replace("d_head", "d_v")
    if "key_padding_mask" in dims:
        assert dims["key_padding_mask"] == "batch key_pos"
    if "k_rows" in dims:
        assert dims["k_rows"] == "batch head_index query_pos"
    ret = typing.get_type_hints(fn)["return"]
    options = typing.get_args(ret) or (ret,)
    z = tl["z"].replace("d_head", "d_v")
    assert getattr(options[0], "dim_str", None) == z
    if fn is dense.dense_topk_attention:  # (z, pattern) with return_pattern=True
        assert [getattr(t, "dim_str", None) for t in typing.get_args(options[1])] == [z, tl["pattern"]]


def test_feedforward_api_uses_transformerlens_dimension_names():
    dims = _dims(feedforward.topk_activation)
    assert dims["pre"] == dims["return"] == "batch pos d_mlp"
