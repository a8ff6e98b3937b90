"""``TopKConfig``: the options of ``tl_plugins.enable(model, "topk", ...)``, validated on creation.

k forms (attention ``k`` and feed-forward ``ff_k``):
    int >= 1                      the same k in every layer and head
    float in (0, 1]               a fraction of each row's valid keys (of d_mlp for ``ff_k``)
    {layer: k}                    per layer; layers not listed stay dense
    {layer: [k_head0, ...]}       per (layer, head) (attention only; None = dense head)
    {(layer, head): k}            per (layer, head); heads not listed stay dense
``layers=`` limits top-k to those layers. Layer and head indices are checked against the model at
enable time.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

from tl_plugins.checks import is_int
from tl_topk.ops.backend import check_backend
from tl_topk.ops.feedforward import FF_RULES
from tl_topk.ops.selection import validate_k_value


def _check_index(value: Any, argument: str) -> int:
    if not is_int(value) or int(value) < 0:
        raise TypeError(f"{argument}: got {value!r}; accepted: a layer/head index, an int >= 0")
    return int(value)


def _normalise_k(value: Any, argument: str, per_head: bool) -> Optional[dict]:
    """{layer or '*': entry} where entry is int/float or, per head, a dict head -> int/float/None."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        return {"*": validate_k_value(value, argument)}
    out: dict = {}
    for key, entry in value.items():
        if isinstance(key, tuple):
            if not per_head:
                raise TypeError(f"{argument}: key {key!r}; per-head k is for attention only")
            if len(key) != 2:
                raise TypeError(f"{argument}: key {key!r}; accepted: layer or (layer, head)")
            layer = _check_index(key[0], f"{argument} key {key!r}")
            head = _check_index(key[1], f"{argument} key {key!r}")
            heads = out.setdefault(layer, {})
            if not isinstance(heads, dict):
                raise ValueError(f"{argument}: layer {layer} given both as a whole and per head")
            heads[head] = validate_k_value(entry, f"{argument}[{key!r}]", allow_none=True)
            continue
        layer = _check_index(key, f"{argument} key {key!r}")
        if layer in out:
            raise ValueError(f"{argument}: layer {layer} given twice")
        if isinstance(entry, (list, tuple)):
            if not per_head:
                raise TypeError(f"{argument}[{layer}]: got a sequence; per-head k is for attention only")
            out[layer] = {h: validate_k_value(x, f"{argument}[{layer}][{h}]", allow_none=True)
                          for h, x in enumerate(entry)}
        else:
            out[layer] = validate_k_value(entry, f"{argument}[{layer}]", allow_none=True)
    return out


@dataclass
class TopKConfig:
    """Options of the ``topk`` plugin.

    Attributes:
        k: attention k (see the module docstring); None leaves attention dense.
        ff_k: feed-forward k (int, fraction of d_mlp, or {layer: k}); None leaves MLPs dense.
        ff_rule: "value" (keep the largest pre-activations, the paper's rule) or "magnitude" (keep the
            largest |act(pre)|).
        layers: only these layers get top-k (attention and feed-forward); None = all.
        backend: "auto", "dense", "chunked", "triton" or "flex". A name other than ``auto`` wins;
            ``auto`` defers to ``tl_topk.ops.use_backend`` around the forward pass, then to the
            environment variable ``TL_TOPK_BACKEND`` (see ``tl_topk.ops.backend``).
        chunk_size: query rows per chunk for the chunked backend (None: from ``memory_budget_mb``).
        memory_budget_mb: transient buffer budget per chunk, MiB.
    """

    k: Any = None
    ff_k: Any = None
    ff_rule: str = "value"
    layers: Optional[Any] = None
    backend: str = "auto"
    chunk_size: Optional[int] = None
    memory_budget_mb: float = 64.0

    def __post_init__(self) -> None:
        if self.k is None and self.ff_k is None:
            raise ValueError("k: got None and ff_k: got None; give k= (attention) and/or ff_k= (feed-forward)")
        self._k = _normalise_k(self.k, "k", per_head=True)
        self._ff_k = _normalise_k(self.ff_k, "ff_k", per_head=False)
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
                raise TypeError(f"layers: got {self.layers!r}; accepted: an iterable of layer indices or None")
            self._layers = frozenset(_check_index(x, "layers") for x in self.layers)
            if not self._layers:
                raise ValueError(f"layers: got {self.layers!r}, which selects no layer (top-k would change "
                                 "nothing); accepted: a non-empty iterable of layer indices, or None for all")
            for argument, mapping in (("k", self._k), ("ff_k", self._ff_k)):
                listed = {x for x in (mapping or {}) if x != "*"}
                if mapping is not None and "*" not in mapping and not listed & self._layers:
                    raise ValueError(f"{argument}: gives k only for layers {sorted(listed)}, none of which "
                                     f"layers={sorted(self._layers)} selects; the option would change nothing")
        else:
            self._layers = None
        if self.ff_rule not in FF_RULES:
            raise ValueError(f"ff_rule: got {self.ff_rule!r}; accepted: {', '.join(FF_RULES)}")
        check_backend(self.backend)
        if self.chunk_size is not None and (not is_int(self.chunk_size) or self.chunk_size < 1):
            raise ValueError(f"chunk_size: got {self.chunk_size!r}; accepted: an int >= 1 or None")
        mb = self.memory_budget_mb
        if isinstance(mb, bool) or not isinstance(mb, numbers.Real) or not math.isfinite(mb) or not mb > 0:
            raise ValueError(f"memory_budget_mb: got {mb!r}; accepted: a finite positive number (MiB)")

    # -- model checks ---------------------------------------------------------------------------
    def check_model(self, n_layers: int, n_heads: int) -> None:
        """Raise ``ValueError`` for layer or head indices the model does not have."""
        def bad_layers(found):
            bad = sorted(x for x in found if x != "*" and x >= n_layers)
            return bad

        for argument, mapping in (("k", self._k), ("ff_k", self._ff_k)):
            if mapping is None:
                continue
            bad = bad_layers(mapping)
            if bad:
                raise ValueError(f"{argument}: unknown layer index(es) {bad}; the model has layers 0..{n_layers - 1}")
            for layer, entry in mapping.items():
                if isinstance(entry, dict):
                    bad_h = sorted(h for h in entry if h >= n_heads)
                    if bad_h:
                        raise ValueError(f"k: layer {layer}: unknown head index(es) {bad_h}; the model has "
                                         f"heads 0..{n_heads - 1}")
        if self._layers is not None:
            bad = sorted(x for x in self._layers if x >= n_layers)
            if bad:
                raise ValueError(f"layers: unknown layer index(es) {bad}; the model has layers 0..{n_layers - 1}")

    # -- lookups --------------------------------------------------------------------------------
    def _entry(self, mapping: Optional[dict], layer: int):
        if mapping is None or (self._layers is not None and layer not in self._layers):
            return None
        return mapping.get(layer, mapping.get("*"))

    def attention_spec(self, layer: int, n_heads: int) -> Optional[tuple]:
        """Per-head k tuple for ``layer`` (None entries = dense heads), or None if the layer is dense."""
        entry = self._entry(self._k, layer)
        if entry is None:
            return None
        if isinstance(entry, dict):
            spec = tuple(entry.get(h) for h in range(n_heads))
        else:
            spec = (entry,) * n_heads
        return None if all(e is None for e in spec) else spec

    def ff_units(self, layer: int, d_mlp: int) -> Optional[int]:
        """Units kept per token in ``layer``'s MLP, or None if it stays dense."""
        entry = self._entry(self._ff_k, layer)
        if entry is None:
            return None
        if isinstance(entry, float):
            return max(1, math.ceil(entry * d_mlp - 1e-9))
        return entry

    @property
    def memory_budget(self) -> int:
        return int(self.memory_budget_mb * 2**20)


@dataclass
class SDPAConfig:
    """Options of the ``sdpa`` plugin (``tl_plugins.enable(model, "sdpa")``): exact dense attention
    through ``scaled_dot_product_attention`` whenever neither ``hook_attn_scores`` nor ``hook_pattern``
    is observed; the model's own dense path otherwise (see ``tl_topk.seam_handlers.sdpa_route``).

    Attributes:
        layers: only these layers use SDPA; None = all.
    """

    layers: Optional[Any] = None

    def __post_init__(self) -> None:
        if self.layers is None:
            self._layers = None
            return
        if isinstance(self.layers, (str, bytes)) or not hasattr(self.layers, "__iter__"):
            raise TypeError(f"layers: got {self.layers!r}; accepted: an iterable of layer indices or None")
        self._layers = frozenset(_check_index(x, "layers") for x in self.layers)
        if not self._layers:
            raise ValueError(f"layers: got {self.layers!r}, which selects no layer; accepted: a non-empty "
                             "iterable of layer indices, or None for all")

    def check_model(self, n_layers: int) -> None:
        if self._layers is not None:
            bad = sorted(x for x in self._layers if x >= n_layers)
            if bad:
                raise ValueError(f"layers: unknown layer index(es) {bad}; the model has layers 0..{n_layers - 1}")

    def covers(self, layer: int) -> bool:
        return self._layers is None or layer in self._layers

