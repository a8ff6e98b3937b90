"""The ``bridge`` backend: TransformerLens's TransformerBridge (transformer-lens 3.x and 4.x).

A bridge wraps a Hugging Face model; its attention components recompute attention step by step so
that every hook point fires. The attention seam uses two per-instance methods of each supported
attention bridge, set with ``object.__setattr__`` (bridge components forward attribute assignment to
the wrapped HF module, so a plain assignment would land there):

* the *throw point*, ``_update_kv_cache``: the library calls it once K and V are projected, rotated
  and extended by the KV cache, just before it computes the [q_pos, k_pos] scores. The seam's
  version runs the library's own cache update, reads the post-rotary queries and the attention mask
  from the calling frame (the library's local variables at that point), asks ``tl_plugins_attention``
  for z and hands it to the catch point by raising a private exception, so the quadratic scores are
  never formed when a plugin computes attention in linear memory;
* the *catch point*, ``forward`` (``PositionEmbeddingsAttentionBridge``: Llama, Mistral, Qwen, Gemma)
  or ``_reconstruct_attention`` (``JointQKVAttentionBridge``: GPT-2), which runs the library's method
  and, when z arrives, finishes the call as the library does: output projection (``hook_z`` is
  ``o.hook_in``), per-head results when ``use_attn_result`` is set, ``hook_out``.

The host's built-in dense attention (:meth:`BridgeAttentionCall.dense`) repeats the library's dense
steps with its own helpers (mask, softmax, NaN scrub, hook points), so a model whose plugins all pass
computes bit-identical outputs. Attention classes that override either method, or that add steps
the seam does not reproduce (attention sinks, gated queries), are refused naming the class:
:func:`support_table` lists every class.

The MLP seam replaces the wrapped HF module's activation (``act_fn`` / ``act``) per instance; with
processed weights (compatibility mode) the gated MLP bridge computes the activation itself, so
there the seam replaces its ``forward`` with the same processed computation around the seam.
"""

from __future__ import annotations

import copy
import inspect
import itertools
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from tl_plugins.backends.base import Backend
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.processing import infer_processing
from tl_plugins.seams import SEAM_OWNER_ATTN, SEAM_OWNER_MLP, AttentionCall, SeamActFn, ask_attention
from tl_plugins.state import BoundMethod, ModelState, set_instance_attr


def is_bridge(model: Any) -> bool:
    """True for TransformerLens's ``TransformerBridge`` and its subclasses (``SAETransformerBridge``)."""
    return any(cls.__name__ == "TransformerBridge" and cls.__module__.startswith("transformer_lens")
               for cls in type(model).__mro__)


# ------------------------------------------------------------------------------------------------
# Attention families: where the seam catches z and which local variable holds the rotated queries
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    base: str          # the supported library class
    catch: str         # the method the seam wraps (catch point)
    query_local: str   # the throw point's caller's local holding q [batch, head, q_pos, d_head]
    joint: bool        # JointQKV family: own scale rule, softmax via _softmax_dropout_pattern


_FAMILIES = {
    f.base: f for f in (
        _Family("PositionEmbeddingsAttentionBridge", "forward", "query_states", joint=False),
        _Family("JointQKVPositionEmbeddingsAttentionBridge", "_reconstruct_attention", "q", joint=True),
        _Family("JointQKVAttentionBridge", "_reconstruct_attention", "q", joint=True),
    )
}
_THROW = "_update_kv_cache"


def attention_family(module: Any) -> tuple[Optional[_Family], str]:
    """(family, "") for an attention bridge (instance or class) the seam reproduces, else (None, why)."""
    cls = module if isinstance(module, type) else type(module)
    for base in cls.__mro__:
        fam = _FAMILIES.get(base.__name__)
        if fam is None:
            continue
        for method in (fam.catch, _THROW):
            if getattr(cls, method, None) is not getattr(base, method, None):
                return None, (f"{cls.__name__} overrides {method}() of {base.__name__}, so the seam "
                              "cannot tell where the scores are formed")
        return fam, ""
    return None, (f"{cls.__name__} computes attention inside the wrapped Hugging Face module (it does "
                  f"not derive from {', '.join(sorted(_FAMILIES))})")


def _refusal(module: Any, config: Any) -> Optional[str]:
    """Why the seam cannot take this attention module, or None."""
    fam, reason = attention_family(module)
    if fam is None:
        return reason
    hf = getattr(module, "original_component", None)
    name = type(module).__name__
    if hf is not None and getattr(hf, "sinks", None) is not None:
        return f"{name} with attention sinks (a learned extra softmax column)"
    if getattr(config, "gated_q_proj", False):
        return f"{name} with gated queries (gated_q_proj)"
    if getattr(module, "_modules", {}).get("gate") is not None:
        return f"{name} with an output gate"
    if getattr(module, "is_cross_attention", False):
        return f"{name} as cross-attention"
    return None


_HOOK_LEVELS = itertools.count(1_000_000)  # context levels of BridgeBackend.hooks, apart from the library's


class _ZReady(Exception):
    """Carries z (and the pattern, when the dense route made z) from the throw point to the catch
    point of the same call."""

    def __init__(self, token: object, z: torch.Tensor, pattern: Optional[torch.Tensor] = None):
        super().__init__("tl_plugins attention seam (internal)")
        self.token = token
        self.z = z
        self.pattern = pattern


@dataclass
class _BridgeSeam:
    layer: int
    state: ModelState
    family: _Family
    token: Optional[object] = field(default=None)
    # (z, pattern) of the last dense() of this module's current call: the catch point returns the
    # pattern, as the library does, when the plugins' z is that z
    dense_out: Optional[tuple] = field(default=None)


def _seam_of(module: Any) -> _BridgeSeam:
    return module.__dict__["_tl_plugins_seam"]


def _catch(self, *args: Any, **kwargs: Any) -> Any:
    """Per-instance catch point (see the module docstring)."""
    seam = _seam_of(self)
    method = getattr(type(self), seam.family.catch)
    token = object()
    outer, seam.token = seam.token, token
    try:
        return method(self, *args, **kwargs)
    except _ZReady as ready:
        if ready.token is not token:
            raise
        return _finish(self, seam.family, ready.z, ready.pattern)
    finally:
        seam.token = outer


def _throw(self, k: torch.Tensor, v: torch.Tensor, **kwargs: Any):
    """Per-instance throw point: the library's cache update, then z from the plugins."""
    k, v = type(self)._update_kv_cache(self, k, v, **kwargs)
    seam = _seam_of(self)
    if seam.token is None:  # called from somewhere other than the catch point: stay out of the way
        return k, v
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    while caller is not None and caller.f_code is BoundMethod.__call__.__code__:
        caller = caller.f_back  # the seam's own binding, not the library's frame
    local = caller.f_locals if caller is not None else {}
    del frame, caller
    q = local.get(seam.family.query_local)
    if not (isinstance(q, torch.Tensor) and q.dim() == 4 and q.shape[0] == k.shape[0]
            and q.shape[-1] == k.shape[-1]):
        raise UnsupportedModelError(
            f"attention seam: {type(self).__name__} in this transformer-lens version has no rotated "
            f"query tensor {seam.family.query_local!r} [batch, head, pos, d_head] where it extends the "
            "KV cache; this version of the bridge is not supported by tl_plugins")
    mask = local.get("attention_mask")
    if mask is None and isinstance(local.get("kwargs"), dict):
        mask = local["kwargs"].get("attention_mask")
    call = BridgeAttentionCall.build(self, seam, q, k, v, mask)
    seam.dense_out = None
    z = ask_attention(call)
    dense_out, seam.dense_out = seam.dense_out, None
    # the library's catch point returns (output, pattern); a plugin that computed z itself (no
    # [q_pos, k_pos] pattern formed) returns None there
    pattern = dense_out[1] if dense_out is not None and dense_out[0] is z else None
    raise _ZReady(seam.token, z, pattern)


def _finish(self, family: _Family, z: torch.Tensor, pattern: Optional[torch.Tensor] = None) -> Any:
    """The library's steps after the attention mix: projection, hooks, return value."""
    b, q_len, n_heads, d_head = z.shape
    attn_output = z.contiguous().reshape(b, q_len, n_heads * d_head)
    use_result = (bool(getattr(self.config, "use_attn_result", False)) and hasattr(self, "o")
                  and self.o.original_component is not None)
    if not family.joint:
        pre = getattr(self, "_pre_output_projection", None)
        if pre is not None:
            attn_output = pre(attn_output)
        o_weight = getattr(getattr(getattr(self, "o", None), "original_component", None), "weight", None)
        if (isinstance(o_weight, torch.Tensor) and o_weight.dtype.is_floating_point
                and attn_output.dtype != o_weight.dtype):
            attn_output = attn_output.to(dtype=o_weight.dtype)
    if use_result:
        attn_output = self.o.hook_in(attn_output)
        z_4d = attn_output.view(b, q_len, n_heads, d_head)
        attn_output = self._compute_per_head_result(z_4d, n_heads, d_head)
    elif family.joint:
        attn_output = self._apply_output_projection(attn_output)
    else:
        attn_output = self.o(attn_output)
    if not family.joint:
        attn_output = self.hook_out(attn_output)  # the joint family's forward fires it itself
    return attn_output, pattern


@dataclass
class BridgeAttentionCall(AttentionCall):
    """An attention call of a TransformerBridge attention component (see the module docstring).

    ``raw_mask`` is the mask the library was given (None, or Hugging Face's [batch, 1, q_pos, k_pos]
    bool or additive mask); ``attention_mask`` is the [batch, k_pos] key-padding mask read off it
    when it is exactly causal (+ sliding window) + key padding, else ``custom_mask`` is True.
    """

    raw_mask: Optional[torch.Tensor] = None
    family: Optional[_Family] = None
    window: Optional[int] = None
    is_custom: bool = False

    @classmethod
    def build(cls, module: Any, seam: _BridgeSeam, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: Optional[torch.Tensor]) -> "BridgeAttentionCall":
        q_len, kv_len = q.shape[-2], k.shape[-2]
        causal = bool(getattr(module, "is_causal", True))
        call = cls(module=module, layer=seam.layer, q=q.transpose(1, 2), k=k.transpose(1, 2),
                   v=v.transpose(1, 2), causal=causal, past_kv_pos_offset=kv_len - q_len,
                   attention_mask=None, additive_attention_mask=None, state=seam.state, raw_mask=mask,
                   family=seam.family)
        call._read_mask()
        if module.training and float(getattr(module.original_component, "attention_dropout", 0.0) or 0.0) > 0:
            call.is_custom = True  # dropout: only the library's dense path reproduces it
        return call

    def _read_mask(self) -> None:
        mask = self.raw_mask
        if mask is None:
            return  # the library then applies the causal mask alone
        if mask.dim() < 4 or mask.shape[1] != 1 or mask.shape[-2] != self.q.shape[1]:
            self.is_custom = True
            return
        mask = mask[:, 0, :, : self.k.shape[1]]
        q_len, kv_len = mask.shape[-2], mask.shape[-1]
        # Read in blocks of query rows, so that no temporary is larger than [batch, block, k_pos].
        block = max(1, (1 << 22) // max(1, mask.shape[0] * kv_len))

        def allowed(rows: slice) -> Optional[torch.Tensor]:
            m = mask[:, rows]
            if m.dtype == torch.bool:
                return m
            ok = m > torch.finfo(m.dtype).min / 2
            if not bool(((m == 0) | ~ok).all()):
                return None  # an additive bias, not a mask
            return ok

        real = torch.zeros(mask.shape[0], kv_len, dtype=torch.bool, device=mask.device)
        for start in range(0, q_len, block):
            a = allowed(slice(start, start + block))
            if a is None:
                self.is_custom = True
                return
            real |= a.any(dim=-2)  # a real key is seen by some query
        kpos = torch.arange(kv_len, device=mask.device)[None, :]
        window = getattr(self.module.original_component, "sliding_window", None)
        for w in [None] + ([int(window)] if window and self.causal else []):
            same = True
            for start in range(0, q_len, block):
                rows = slice(start, min(start + block, q_len))
                qpos = torch.arange(rows.start, rows.stop, device=mask.device)[:, None] + (kv_len - q_len)
                band = kpos <= qpos if self.causal else torch.ones_like(kpos <= qpos)
                if w is not None:
                    band = band & (kpos > qpos - w)
                if not torch.equal(band[None] & real[:, None, :], allowed(rows)):
                    same = False
                    break
            if same:
                self.window = w
                self.attention_mask = None if bool(real.all()) else real.long()
                return
        self.is_custom = True

    # -- facts -----------------------------------------------------------------------------------
    @property
    def _head_dim(self) -> int:
        return int(self.q.shape[-1])

    @property
    def scale(self) -> float:
        m = self.module
        if self.family is not None and self.family.joint:
            scale = self._head_dim ** (-0.5)
            if (self.family.base == "JointQKVAttentionBridge"
                    and getattr(m.config, "scale_attn_by_inverse_layer_idx", False)
                    and getattr(m, "_layer_idx", None) is not None):
                scale /= float(m._layer_idx + 1)
            return scale
        return float(getattr(m.original_component, "scaling", self._head_dim ** -0.5))

    @property
    def softcap(self) -> Optional[float]:
        if self.family is not None and self.family.joint:
            return None
        cap = getattr(self.module.original_component, "attn_logit_softcapping", None)
        return float(cap) if cap is not None and cap > 0 else None

    @property
    def window_size(self) -> Optional[int]:
        return self.window

    @property
    def custom_mask(self) -> bool:
        return self.is_custom

    # -- the library's dense path, step by step ----------------------------------------------------
    def _library_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, h, q, d] and K/V expanded to every query head, [b, h, k, d], as the library has them."""
        q, k, v = self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)
        n_rep = q.shape[1] // k.shape[1]
        if n_rep > 1:
            if self.family is not None and self.family.joint:
                k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
            else:
                from transformers.models.llama.modeling_llama import repeat_kv

                k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return q, k, v

    def dense_scores(self) -> torch.Tensor:
        m = self.module
        q, k, _ = self._library_layout()
        if self.family is not None and self.family.joint:
            if getattr(m, "_reorder_and_upcast_attn", False):
                q, k = q.to(torch.float32), k.to(torch.float32)
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        else:
            scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
            cap = getattr(m.original_component, "attn_logit_softcapping", None)
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
        return m._apply_reconstruct_attention_mask(
            attn_scores=scores, attention_mask=self.raw_mask, seq_len=k.shape[-2], q_seq_len=q.shape[-2])

    def dense(self, scores_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        m = self.module
        q, _, v = self._library_layout()
        scores = m.hook_attn_scores(self.dense_scores())
        if scores_transform is not None:
            scores = scores_transform(scores)
        if self.family is not None and self.family.joint:
            upcast = (self.family.base == "JointQKVAttentionBridge"
                      and getattr(m, "_reorder_and_upcast_attn", False))
            pattern = m._softmax_dropout_pattern(scores, target_dtype=v.dtype if upcast else None)
        else:
            softmax = getattr(m, "_masked_softmax", None)  # transformer-lens >= 4.x
            if softmax is not None:
                pattern = softmax(scores, dtype=torch.float32).to(q.dtype)
            else:
                pattern = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            pattern = m._scrub_compatibility_pattern_nans(pattern)
            rate = float(getattr(m.original_component, "attention_dropout", 0.0) or 0.0)
            if m.training and rate > 0.0:
                pattern = torch.nn.functional.dropout(pattern, p=rate, training=True)
            pattern = m.hook_pattern(pattern)
        z = torch.matmul(pattern, v).transpose(1, 2)
        seam = m.__dict__.get("_tl_plugins_seam")
        if seam is not None:
            seam.dense_out = (z, pattern)
        return z

    def dense_z(self, pattern: torch.Tensor) -> torch.Tensor:
        _, _, v = self._library_layout()
        return torch.matmul(pattern.to(v.dtype), v).transpose(1, 2)


# ------------------------------------------------------------------------------------------------
# The MLP seam
# ------------------------------------------------------------------------------------------------

_ACT_ATTRS = ("act_fn", "act", "activation_fn", "activation")


def _hf_activation(mlp: Any) -> tuple[Any, Optional[str]]:
    hf = getattr(mlp, "original_component", None)
    for attr in _ACT_ATTRS:
        if hf is not None and callable(getattr(hf, attr, None)):
            return hf, attr
    return hf, None


def _processed_gated_forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
    """GatedMLPBridge's processed-weights computation with the activation through the seam."""
    act: SeamActFn = self.__dict__["_tl_plugins_act"]
    if not getattr(self, "_use_processed_weights", False):
        return type(self).forward(self, *args, **kwargs)
    W_gate, b_gate = self.gate.weight, self.gate.bias
    W_in, b_in = getattr(self, "in").weight, getattr(self, "in").bias
    W_out, b_out = self.out.weight, self.out.bias
    hidden = self.hook_in(args[0])
    gate = self.gate.hook_out(torch.nn.functional.linear(hidden, W_gate, b_gate))
    linear = getattr(self, "in").hook_out(torch.nn.functional.linear(hidden, W_in, b_in))
    inner = self.out.hook_in(act(gate) * linear)
    out = self.out.hook_out(torch.nn.functional.linear(inner, W_out, b_out))
    return self.hook_out(out)


def _library_activation(mlp: Any) -> Callable:
    module = sys.modules.get(type(mlp).__module__)
    resolve = getattr(module, "resolve_activation_fn", None)
    if resolve is None:
        from transformer_lens.model_bridge.generalized_components.gated_mlp import (
            resolve_activation_fn as resolve,
        )
    return resolve(mlp.config)


# ------------------------------------------------------------------------------------------------
# The backend
# ------------------------------------------------------------------------------------------------


class BridgeBackend(Backend):
    """TransformerBridge: ``blocks[l].attn`` / ``.mlp`` bridge components around an HF model."""

    name = "bridge"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        return is_bridge(model)

    @classmethod
    def describe(cls) -> str:
        return "TransformerBridge / SAETransformerBridge (transformer-lens 3.x and 4.x)"

    # -- facts -----------------------------------------------------------------------------------
    @property
    def n_ctx(self) -> int:
        n = getattr(self.cfg, "n_ctx", None)
        if n is None:
            n = getattr(self.model.original_model.config, "max_position_embeddings", 2048)
        return int(n)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def compatibility_mode(self) -> bool:
        return bool(getattr(self.model, "compatibility_mode", False))

    @property
    def layer_norm_folded(self) -> bool:
        """True when compatibility mode folded the norms' scales into the next weights.

        TransformerLens (3.9, 4.3) sets no config flag when a bridge's weights are processed in place
        (``enable_compatibility_mode`` / ``process_weights``); it records only that they were, and
        folding leaves every norm an identity scale (weight 1, or 0 with Gemma's 1 + weight; bias 0).
        """
        if bool(getattr(self.cfg, "layer_norm_folding", False)) or str(
                getattr(self.cfg, "normalization_type", "") or "").endswith("Pre"):
            return True
        if not getattr(self.model, "_weights_processed", False):
            return False
        identity = 0.0 if getattr(self.cfg, "rmsnorm_uses_offset", False) else 1.0
        norms = [blk._modules.get(n) for blk in self.model.blocks for n in ("ln1", "ln2")]
        norms.append(self.model._modules.get("ln_final"))
        scales = 0
        for norm in norms:
            hf = norm._modules.get("_original_component") if norm is not None else None
            w = getattr(hf, "weight", None) if hf is not None else None
            b = getattr(hf, "bias", None) if hf is not None else None
            if isinstance(w, torch.Tensor):
                scales += 1
                if not bool((w == identity).all()):
                    return False
            if isinstance(b, torch.Tensor) and not bool((b == 0).all()):
                return False
        return scales > 0

    # -- modules and seams -----------------------------------------------------------------------
    def attention_modules(self) -> list[tuple[int, Any]]:
        return [(i, block.attn) for i, block in enumerate(self.model.blocks)]

    def mlp_modules(self) -> list[tuple[int, Any]]:
        out = []
        for i, block in enumerate(self.model.blocks):
            mlp = block._modules.get("mlp")
            if mlp is not None:
                out.append((i, mlp))
        return out

    def check_attention_supported(self, plugin: str) -> None:
        for layer, attn in self.attention_modules():
            reason = _refusal(attn, self.cfg)
            if reason is not None:
                raise UnsupportedModelError(
                    f"plugin {plugin!r}: blocks.{layer}.attn is {type(attn).__name__}, which the attention "
                    f"seam does not support: {reason}. Supported attention bridges: "
                    f"{', '.join(sorted(_FAMILIES))} (docs/backends.md lists every architecture).")

    def install_attention_seam(self, model_state: ModelState) -> None:
        for layer, attn in self.attention_modules():
            fam, _ = attention_family(attn)
            assert fam is not None  # check_attention_supported ran first
            set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, "_tl_plugins_seam",
                              _BridgeSeam(layer, model_state, fam))
            set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, fam.catch, BoundMethod(_catch, attn))
            set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, _THROW, BoundMethod(_throw, attn))

    def install_mlp_seam(self, model_state: ModelState) -> None:
        for layer, mlp in self.mlp_modules():
            if getattr(mlp, "_use_processed_weights", False) and type(mlp).__name__ == "GatedMLPBridge":
                act = SeamActFn(mlp, layer, _library_activation(mlp), model_state)
                set_instance_attr(self.model, SEAM_OWNER_MLP, mlp, "_tl_plugins_act", act)
                set_instance_attr(self.model, SEAM_OWNER_MLP, mlp, "forward",
                                  BoundMethod(_processed_gated_forward, mlp))
                continue
            hf, attr = _hf_activation(mlp)
            if attr is None or getattr(mlp, "_use_processed_weights", False):
                raise UnsupportedModelError(
                    f"MLP seam: blocks.{layer}.mlp is {type(mlp).__name__} around "
                    f"{type(hf).__name__}, whose activation the seam cannot reach; accepted: MLP bridges "
                    f"whose Hugging Face module has one of {', '.join(_ACT_ATTRS)} (processed weights: "
                    "GatedMLPBridge)")
            original = getattr(hf, attr)
            set_instance_attr(self.model, SEAM_OWNER_MLP, hf, attr, SeamActFn(mlp, layer, original, model_state))

    # -- readouts --------------------------------------------------------------------------------
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        ln = self.model._modules.get("ln_final")
        return resid if ln is None else ln(resid)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(x)

    def readout(self, resid: torch.Tensor) -> torch.Tensor:
        logits = self.unembed(self.final_norm(resid))
        cap = getattr(self.model.original_model.config, "final_logit_softcapping", None)
        if cap is not None and cap > 0:
            logits = cap * torch.tanh(logits / cap)
        return logits

    def attention_input_hook(self, layer: int) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        return f"blocks.{self.check_layer(layer)}.attn.hook_in", lambda x: x

    def _hook_point(self, name: str, hook_dict: list) -> Any:
        """The HookPoint named ``name`` (canonical names by module path, aliases through ``hook_dict``,
        which is computed at most once per caller: on 3.x the bridge rebuilds it on every access)."""
        try:
            mod = self.model.get_submodule(name)
        except AttributeError:
            mod = None
        if mod is not None and getattr(mod, "name", None) == name and hasattr(mod, "add_hook"):
            return mod
        if not hook_dict:
            hook_dict.append(self.model.hook_dict)
        return hook_dict[0].get(name)

    def has_hook(self, name: str) -> bool:
        return self._hook_point(name, []) is not None

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
        # The library's own ``hooks()`` on 3.x rebuilds ``hook_dict`` (every alias of every hook point)
        # once per hook it adds, seconds for a few hundred hooks on a 30-layer model; so the hook points
        # are resolved once here and the hooks added and removed with HookPoint's own API, at a context
        # level of their own (the caller's hooks at other levels are left alone).
        fwd_hooks = list(fwd_hooks)
        cache: list = []
        points = []
        gated = getattr(self.model, "_gated_hook_reason", None)
        for name, fn in fwd_hooks:
            hp = self._hook_point(name, cache)
            if hp is None:
                raise KeyError(f"hook name: got {name!r}, which is not a hook point of this "
                               f"{type(self.model).__name__}")
            reason = gated(hp.name or name) if gated is not None else None
            if reason is not None:
                raise ValueError(f"hook name: {name!r} never fires unless {reason} is set "
                                 f"(model.set_{reason}(True))")
            points.append((hp, fn))
        level = next(_HOOK_LEVELS)
        try:
            for hp, fn in points:
                hp.add_hook(fn, dir="fwd", level=level)
            yield
        finally:
            for hp in {id(hp): hp for hp, _ in points}.values():
                hp.remove_hooks(dir="fwd", level=level)

    def attention_scores_from_qk(self, layer: int):
        layer = self.check_layer(layer)
        attn = self.model.blocks[layer].attn
        fam, reason = attention_family(attn)
        if fam is None:
            raise UnsupportedModelError(f"model: blocks.{layer}.attn: cannot rebuild attention scores: {reason}")
        q_name, k_name = self.hook_name("rot_q", layer), self.hook_name("rot_k", layer)
        if not (self.has_hook(q_name) and self.has_hook(k_name)):  # no rotary: q and k as projected
            q_name, k_name = self.hook_name("q", layer), self.hook_name("k", layer)
        hf = attn.original_component
        cap = None if fam.joint else getattr(hf, "attn_logit_softcapping", None)

        def scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
            # the library's rules, as in BridgeAttentionCall.scale / dense_scores
            d_head = q.shape[-1]
            if fam.joint:
                scale = d_head ** -0.5
                if (fam.base == "JointQKVAttentionBridge"
                        and getattr(attn.config, "scale_attn_by_inverse_layer_idx", False)
                        and getattr(attn, "_layer_idx", None) is not None):
                    scale /= float(attn._layer_idx + 1)
            else:
                scale = float(getattr(hf, "scaling", d_head ** -0.5))
            rep = q.shape[2] // k.shape[2]
            if rep > 1:
                k = torch.repeat_interleave(k, rep, dim=2)
            out = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
            if cap is not None and cap > 0:
                out = torch.tanh(out / cap) * cap
            return out

        return q_name, k_name, scores

    # -- weights ---------------------------------------------------------------------------------
    def _expand_kv(self, w: torch.Tensor) -> torch.Tensor:
        rep = self.n_heads // w.shape[0]
        return w if rep == 1 else torch.repeat_interleave(w, rep, dim=0)

    @staticmethod
    def _maybe(obj: Any, attr: str) -> Optional[torch.Tensor]:
        try:
            value = getattr(obj, attr)
        except (AttributeError, KeyError, RuntimeError, ValueError, TypeError):
            return None
        return value if isinstance(value, torch.Tensor) else None

    def weight(self, name: str, layer: Optional[int] = None) -> Optional[torch.Tensor]:
        m = self.model
        if name == "W_E":
            return m.W_E
        if name == "W_U":
            return m.W_U
        if name == "b_U":
            b = self._maybe(m, "b_U")
            return b if b is not None else torch.zeros(self.d_vocab, dtype=m.W_U.dtype, device=m.W_U.device)
        if name == "W_pos":
            if getattr(self.cfg, "positional_embedding_type", "standard") not in ("standard", "shortformer"):
                return None
            pos = m._modules.get("pos_embed")
            return None if pos is None else self._maybe(pos, "W_pos")
        if name == "ln_final_w":
            ln = m._modules.get("ln_final")
            if ln is None or self.layer_norm_folded or self.processing().fold_ln:
                return None
            hf = getattr(ln, "original_component", None)
            return _effective_norm_weight(hf, self._maybe(hf, "weight"))
        block = m.blocks[self.check_layer(layer)]
        attn = block.attn
        if name in ("W_Q", "W_K", "W_V", "W_O"):
            w = getattr(attn, name)
            return self._expand_kv(w) if name in ("W_K", "W_V") else w
        if name in ("b_Q", "b_K", "b_V", "b_O"):
            b = self._maybe(attn, name)
            ref = attn.W_Q
            if b is None:
                shape = (self.d_model,) if name == "b_O" else (self.n_heads, self.d_head)
                return torch.zeros(shape, dtype=ref.dtype, device=ref.device)
            return self._expand_kv(b) if name in ("b_K", "b_V") and b.dim() == 2 else b
        if name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            mlp = block._modules.get("mlp")
            if mlp is None:
                raise UnsupportedModelError("model: this model has no MLP weights")
            if name == "W_gate":
                return self._maybe(mlp, "W_gate") if self.gated_mlp else None
            value = self._maybe(mlp, name)
            if value is not None:
                return value
            ref = mlp.W_in
            size = self.d_mlp if name == "b_in" else self.d_model
            return torch.zeros(size, dtype=ref.dtype, device=ref.device)
        raise KeyError(f"name: unknown weight {name!r}")

    def processing(self) -> Any:
        return infer_processing(self.model, self)

    # -- training --------------------------------------------------------------------------------
    def _names_of(self, module: Any) -> dict[str, torch.nn.Parameter]:
        by_id = {id(p): n for n, p in self.model.named_parameters()}
        return {by_id[id(p)]: p for p in module.parameters() if id(p) in by_id}

    def attention_parameters(self, layer: int, letter: str) -> dict[str, torch.nn.Parameter]:
        attn = self.model.blocks[self.check_layer(layer)].attn
        proj = attn._modules.get(letter)
        if proj is None:
            return {}
        named = self._names_of(proj)
        shared = [n for n in named if named[n] is not None and any(
            named[n] is p for other in "qkvo" if other != letter and attn._modules.get(other) is not None
            for p in attn._modules[other].parameters())]
        if shared:
            raise UnsupportedModelError(
                f"params: projection {letter!r} of layer {layer} shares its tensor {shared[0]} with other "
                "projections (a fused QKV weight); plain SGD on it would also train them")
        return dict(sorted(named.items(), key=lambda kv: not kv[0].endswith("weight")))

    def layer_of(self, parameter_name: str) -> Optional[int]:
        p = self.named_parameters().get(parameter_name)
        if p is None:
            return None
        for layer, block in enumerate(self.model.blocks):  # by identity: one parameter walk, not one per block
            if any(q is p for q in block.parameters()):
                return layer
        return None

    def untrained_copy(self, *, seed: int, keep_embeddings: bool) -> Any:
        src = self.model
        hf = src.original_model
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            new_hf = type(hf)(copy.deepcopy(hf.config)).to(dtype=self.dtype).eval()
            # booting splits fused QKV weights into freshly built nn.Linear modules, whose default
            # initialisation draws from the global RNG: keep it inside the fork
            bridge = boot(new_hf, src.tokenizer, device=str(self.device))
        for fact in ("n_ctx", "default_prepend_bos"):  # what the loader set on the source's cfg
            if hasattr(src.cfg, fact):
                setattr(bridge.cfg, fact, getattr(src.cfg, fact))
        if keep_embeddings:
            keep = (*[m for m in (src._modules.get(n) for n in ("embed", "pos_embed", "ln_final", "unembed"))
                      if m is not None],
                    *[blk._modules[n] for blk in src.blocks for n in ("ln1", "ln2") if n in blk._modules])
            mapping = {id(p): n for n, p in src.named_parameters()}
            wanted = {mapping[id(p)] for mod in keep for p in mod.parameters() if id(p) in mapping}
            new_named = dict(bridge.named_parameters())
            with torch.no_grad():
                for name, p in src.named_parameters():
                    if name in wanted and name in new_named:
                        new_named[name].copy_(p)
        if self.compatibility_mode:
            bridge.enable_compatibility_mode(disable_warnings=True)
        bridge.eval()
        return bridge

    # -- running ---------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, *, params: Optional[dict[str, torch.Tensor]] = None,
            stop_at_layer: Optional[int] = None, kv_cache: Any = None) -> torch.Tensor:
        kw: dict[str, Any] = {}
        if kv_cache is not None:
            kw["past_key_values"] = kv_cache.for_call()
        if stop_at_layer is not None and stop_at_layer == self.n_layers:
            # The bridge stops only *before* a block, so stop_at_layer=n_layers would return logits.
            # The library's own early exit (StopAtLayerException, caught by its forward) raised from
            # the final norm's input returns the residual stream after the last block instead,
            # without unembedding every position.
            from transformer_lens.model_bridge.exceptions import StopAtLayerException

            def stop(x: torch.Tensor, hook: Any) -> None:
                raise StopAtLayerException(x)
            name = "ln_final.hook_in" if self.has_hook("ln_final.hook_in") else self.hook_name(
                "resid_post", self.n_layers - 1)
            with self.hooks([(name, stop)]):  # added last: runs after the caller's hooks
                return self.functional_call(params, tokens, **kw)
        if stop_at_layer is not None:
            kw["stop_at_layer"] = stop_at_layer
        return self.functional_call(params, tokens, **kw)

    def functional_call(self, params: Optional[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the named parameters replaced; the model is never modified.

        A bridge reaches a module by several paths (``transformer.h.0.attn`` and
        ``transformer.h.0._original_component.attn`` are one module): ``torch.func.functional_call``
        with ``tie_weights=True`` swaps such a tensor once per path and puts the *replacement* back on
        exit. So each (module, attribute) slot is swapped once here, the slots of a tied tensor
        (GPT-2's embedding and unembedding) all of them. Tensors the library's forward leaves on its
        modules (JointQKV attention keeps its last pattern in ``_pattern``) are put back as they were,
        so a run with gradients leaves no autograd graph on the model.
        """
        saved = _tensor_attrs(self.model)
        try:
            if not params:
                return self.model(*args, **kwargs)
            return torch.func.functional_call(self.model, _one_name_per_slot(self.model, params), args,
                                              kwargs, strict=False, tie_weights=False)
        finally:
            _restore_tensor_attrs(saved)

    def prefix_cache(self, tokens: Sequence[int], params: Optional[dict[str, torch.Tensor]] = None) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        toks = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
        with torch.no_grad():
            self.functional_call(params, toks, past_key_values=cache)
        return _FrozenCache(_cache_tensors(cache), 1)

    def expand_cache(self, cache: Any, batch: int) -> Any:
        return _FrozenCache(cache.layers, batch)

    def generate(self, tokens: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("verbose", False)
        return self.model.generate(tokens, max_new_tokens=max_new_tokens, **kwargs)

    # -- text ------------------------------------------------------------------------------------
    @property
    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.cfg, "default_prepend_bos", True))


def _one_name_per_slot(model: Any, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` keyed by one name per (module, attribute) slot, extended to every slot that holds
    the same tensor (tied weights); names that are not parameters or buffers pass through."""
    slots: dict[int, list[str]] = {}
    current: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():  # each module once, under its first path
        for attr, t in (*mod._parameters.items(), *mod._buffers.items()):
            if t is not None:
                full = f"{mod_name}.{attr}" if mod_name else attr
                slots.setdefault(id(t), []).append(full)
                current[full] = t
    every = dict(model.named_parameters(remove_duplicate=False))
    every.update(dict(model.named_buffers(remove_duplicate=False)))
    out: dict[str, torch.Tensor] = {}
    for name, value in params.items():
        t = every.get(name)
        if t is None:
            out[name] = value
            continue
        for slot in slots.get(id(t), [name]):
            out[slot] = value
    return out


def _tensor_attrs(model: Any) -> list[tuple[Any, dict[str, torch.Tensor]]]:
    """Every module with the plain tensor attributes it holds now (not parameters or buffers)."""
    return [(mod, {k: v for k, v in vars(mod).items() if isinstance(v, torch.Tensor)})
            for mod in model.modules()]


def _restore_tensor_attrs(saved: list[tuple[Any, dict[str, torch.Tensor]]]) -> None:
    for mod, before in saved:
        d = vars(mod)
        for k in [k for k, v in d.items() if isinstance(v, torch.Tensor) and k not in before]:
            del d[k]
        for k, v in before.items():
            if d.get(k) is not v:
                d[k] = v


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) [batch, kv_head, pos, d_head] per layer of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [(layer.keys, layer.values) for layer in layers]
    return [(k, v) for k, v in zip(cache.key_cache, cache.value_cache)]  # older transformers


class _FrozenCache:
    """A prefix's keys and values; every call gets a fresh transformers cache that starts from them
    (expanded to the batch without a copy), so runs never extend the prefix itself."""

    def __init__(self, layers: list[tuple[torch.Tensor, torch.Tensor]], batch: int):
        self.layers = layers
        self.batch = batch

    @property
    def length(self) -> int:
        return int(self.layers[0][0].shape[-2]) if self.layers else 0

    def for_call(self) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache()
        for i, (k, v) in enumerate(self.layers):
            cache.update(k.expand(self.batch, -1, -1, -1), v.expand(self.batch, -1, -1, -1), i)
        return cache


# ------------------------------------------------------------------------------------------------
# Booting bridges offline, and the support table
# ------------------------------------------------------------------------------------------------


def boot(hf_model: Any, tokenizer: Any = None, *, device: str = "cpu", folder: Optional[str] = None) -> Any:
    """``TransformerBridge.boot_transformers`` on an in-memory HF model, offline.

    The library reads the model's config (and, without ``tokenizer``, a tokenizer) from a folder;
    ``folder`` is used when given, else a temporary one holding the config (and tokenizer).
    """
    import os
    import tempfile

    from transformer_lens.model_bridge import TransformerBridge

    if not getattr(hf_model.config, "architectures", None):
        # TransformerLens picks its adapter from config.architectures; a model built from a config
        # in code has none.
        hf_model.config.architectures = [type(hf_model).__name__]
    with tempfile.TemporaryDirectory(prefix="tl-plugins-boot-") as tmp:
        path = folder or tmp
        if folder is None:
            hf_model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                os.fspath(path), hf_model=hf_model, tokenizer=tokenizer, device=device,
                dtype=next(hf_model.parameters()).dtype)
    bridge.eval()
    return bridge


def support_table() -> dict[str, dict[str, str]]:
    """Attention bridge class name -> {plugin: "yes" | "refused: reason" | "untested: ..."} for every
    attention bridge class loaded (the library's own and those of imported architecture adapters);
    docs/backends.md is generated from it by scripts/backends_table.py."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    seen: dict[str, type] = {}
    todo = [AttentionBridge]
    while todo:
        cls = todo.pop()
        if cls.__name__ not in seen:
            seen[cls.__name__] = cls
            todo.extend(cls.__subclasses__())
    out: dict[str, dict[str, str]] = {}
    for name, cls in sorted(seen.items()):
        fam, reason = attention_family(cls)
        if fam is not None:
            out[name] = {"topk": "yes", "embedspace": "yes", "iclgd": "yes"}
        else:
            out[name] = {"topk": f"refused: {reason}",
                         "embedspace": "untested: reads the bridge's W_Q/W_K/W_V/W_O",
                         "iclgd": "untested: needs pre-softmax hook_attn_scores"}
    return out


__all__ = ["BridgeBackend", "BridgeAttentionCall", "attention_family", "boot", "is_bridge", "support_table"]


def _effective_norm_weight(hf_norm: Any, weight: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The multiplier an HF RMS norm applies: ``weight``, or ``1 + weight`` for the Gemma family,
    which stores ``w - 1`` (told apart by probing the module with a constant vector, where the
    RMS scale is known: ``norm(c * 1) = w_eff * c / sqrt(c^2 + eps)``)."""
    if weight is None or hf_norm is None or weight.dim() != 1:
        return weight
    from tl_plugins.backends.base import rms_norm_multiplier

    eps = float(getattr(hf_norm, "eps", getattr(hf_norm, "variance_epsilon", 1e-6)))
    try:
        eff = rms_norm_multiplier(hf_norm, weight.numel(), eps=eps, dtype=weight.dtype, device=weight.device)
    except Exception:  # not callable on a bare tensor: keep the stored weight
        return weight
    w = weight.detach().float().cpu()
    if torch.allclose(eff, w + 1, atol=1e-4, rtol=1e-4) and not torch.allclose(eff, w, atol=1e-4, rtol=1e-4):
        return weight + 1
    return weight

