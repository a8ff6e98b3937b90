"""Method seams: where plugins change a model's forward pass without replacing modules.

The host installs, once per attention module, a per-instance ``forward`` that runs
TransformerLens's own attention steps (q/k/v projection, KV cache, rotary, every hook point) and
asks the ``tl_plugins_attention`` hook for the mix ``z``. The host's ``trylast`` implementation is
TransformerLens's dense attention, reproduced operation for operation, so a model whose plugins all
pass computes bit-identical outputs. The MLP seam wraps ``act_fn`` the same way for
``tl_plugins_mlp_activation``.

Nothing here is a hook on a hook point: SAELens replaces hook-point modules to attach SAEs, and
the seam looks hook points up by attribute at call time, so an attached SAE keeps firing.
Deleting the instance attributes (``tl_plugins.disable``) restores the class methods.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any, Callable, Optional

import einops
import torch
import torch.nn.functional as F

from tl_plugins.errors import UnsupportedModelError
from tl_plugins.plugins import get_plugin_manager
from tl_plugins.state import ModelState, get_state, set_instance_attr

SEAM_OWNER_ATTN = "__attention_seam__"
SEAM_OWNER_MLP = "__mlp_seam__"


def _softcap(x: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    if cap is None or cap <= 0:
        return x
    return cap * torch.tanh(x / cap)


@dataclass
class AttentionCall:
    """One call of an attention module, as seen by ``tl_plugins_attention`` implementations.

    Shapes (TransformerLens layout):
        q: [batch, q_pos, n_heads, d_head], post-rotary (what ``hook_rot_q`` produced).
        k, v: [batch, k_pos, n_kv_heads, d_head], post-rotary, grouped-query K/V not expanded.
        attention_mask: [batch, k_pos] int (1 = real token) or None.
        additive_attention_mask: broadcastable to [batch, 1, 1, k_pos] or None.
    Query i sits at absolute key position ``past_kv_pos_offset + i``.
    """

    module: Any
    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    causal: bool
    past_kv_pos_offset: int
    attention_mask: Optional[torch.Tensor]
    additive_attention_mask: Optional[torch.Tensor]
    state: Optional[ModelState]

    # -- facts ---------------------------------------------------------------------------------
    @property
    def attn_scale(self) -> float:
        """TransformerLens divides q.k by this (sqrt(d_head) unless configured otherwise)."""
        return float(self.module.attn_scale)

    @property
    def scale(self) -> float:
        """Multiplier of q.k: ``1 / attn_scale``."""
        return 1.0 / self.attn_scale

    @property
    def softcap(self) -> Optional[float]:
        cap = getattr(self.module.cfg, "attn_scores_soft_cap", None)
        return cap if cap is not None and cap > 0 else None

    @property
    def window_size(self) -> Optional[int]:
        """Sliding-window size for local attention layers, else None."""
        if getattr(self.module, "attn_type", "global") == "local":
            return int(self.module.cfg.window_size)
        return None

    @property
    def n_heads(self) -> int:
        return self.q.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def key_padding_mask(self) -> Optional[torch.Tensor]:
        """[batch, k_pos] bool, True where the key is a real token; None if there is no padding."""
        if self.attention_mask is None:
            return None
        return self.attention_mask[:, -self.k.shape[1] :].bool()

    def config(self, name: str) -> Any:
        """The config of plugin ``name`` on this model, or None when it is not enabled."""
        return None if self.state is None else self.state.config(name)

    # -- hook points ---------------------------------------------------------------------------
    def scores_hooked(self) -> bool:
        """True when someone observes or edits ``hook_attn_scores`` or ``hook_pattern`` now."""
        return _has_hooks(self.module.hook_attn_scores) or _has_hooks(self.module.hook_pattern)

    def hook_attn_scores(self, scores: torch.Tensor) -> torch.Tensor:
        return self.module.hook_attn_scores(scores)

    def hook_pattern(self, pattern: torch.Tensor) -> torch.Tensor:
        return self.module.hook_pattern(pattern)

    # -- the dense reference, step by step -----------------------------------------------------
    def dense_scores(self) -> torch.Tensor:
        """Scaled, soft-capped, masked scores [batch, head, q_pos, k_pos], as TransformerLens does."""
        m = self.module
        scores = m.calculate_attention_scores(self.q, self.k)
        if self.causal:
            scores = m.apply_causal_mask(scores, self.past_kv_pos_offset, self.attention_mask)
        if self.additive_attention_mask is not None:
            scores += self.additive_attention_mask
        return scores

    def dense_z(self, pattern: torch.Tensor) -> torch.Tensor:
        """``pattern @ v`` as [batch, q_pos, head, d_head] (before ``hook_z``)."""
        v = self.v
        if v.shape[2] != pattern.shape[1]:
            v = torch.repeat_interleave(v, dim=2, repeats=pattern.shape[1] // v.shape[2])
        v_ = einops.rearrange(v, "batch key_pos head_index d_head -> batch head_index key_pos d_head")
        return einops.rearrange(
            pattern @ v_, "batch head_index query_pos d_head -> batch query_pos head_index d_head"
        )

    def dense(self, scores_transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        """TransformerLens's dense attention; ``scores_transform`` edits scores after the hook."""
        scores = self.hook_attn_scores(self.dense_scores())
        if scores_transform is not None:
            scores = scores_transform(scores)
        pattern = F.softmax(scores, dim=-1)
        pattern = torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)
        pattern = self.hook_pattern(pattern)
        pattern = pattern.to(device=self.v.device, dtype=self.v.dtype)
        return self.dense_z(pattern)


def _has_hooks(hook_point: Any) -> bool:
    has = getattr(hook_point, "has_hooks", None)
    if has is not None:
        return bool(has())
    return bool(getattr(hook_point, "fwd_hooks", None) or getattr(hook_point, "_forward_hooks", None))


@dataclass
class MLPActivationCall:
    """One ``act_fn`` call of an MLP. ``pre``: [batch, pos, d_mlp], the output of ``hook_pre``."""

    module: Any
    layer: int
    pre: torch.Tensor
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    state: Optional[ModelState]

    def config(self, name: str) -> Any:
        return None if self.state is None else self.state.config(name)


# ------------------------------------------------------------------------------------------------
# The attention seam for HookedTransformer attention (AbstractAttention subclasses)
# ------------------------------------------------------------------------------------------------

_UNSUPPORTED_ATTENTION = {
    "load_in_4bit": "4-bit quantised weights",
    "use_attention_sinks": "attention sinks",
    "use_logn_attn": "log-n attention scaling",
    "clip_qkv": "q/k/v clipping",
}


def check_attention_supported(cfg: Any, plugin: str) -> None:
    """Raise ``UnsupportedModelError`` for attention variants the seam does not reproduce."""
    pe = getattr(cfg, "positional_embedding_type", "standard")
    if pe in ("alibi", "relative_positional_bias"):
        raise UnsupportedModelError(
            f"plugin {plugin!r}: model cfg.positional_embedding_type={pe!r} is not supported by the "
            "attention seam; accepted: 'standard', 'rotary', 'shortformer'."
        )
    for attr, what in _UNSUPPORTED_ATTENTION.items():
        value = getattr(cfg, attr, None)
        if value not in (None, False):
            raise UnsupportedModelError(
                f"plugin {plugin!r}: model cfg.{attr}={value!r} ({what}) is not supported by the "
                "attention seam; it needs cfg.{attr} unset."
            )
    arch = getattr(cfg, "original_architecture", None)
    if arch in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        raise UnsupportedModelError(
            f"plugin {plugin!r}: model architecture {arch!r} (QK-norm before the head split) is not "
            "supported by the attention seam."
        )


def _seam_forward(
    self,
    query_input,
    key_input,
    value_input,
    past_kv_cache_entry=None,
    additive_attention_mask=None,
    attention_mask=None,
    position_bias=None,
):
    """Per-instance replacement of ``AbstractAttention.forward`` (see the module docstring)."""
    seam = self.__dict__["_tl_plugins_seam"]
    q, k, v = self.calculate_qkv_matrices(query_input, key_input, value_input)
    if past_kv_cache_entry is not None:
        offset = past_kv_cache_entry.past_keys.size(1)
        k, v = past_kv_cache_entry.append(k, v)
    else:
        offset = 0
    if self.cfg.positional_embedding_type == "rotary":
        q = self.hook_rot_q(self.apply_rotary(q, offset, attention_mask))
        k = self.hook_rot_k(self.apply_rotary(k, 0, attention_mask))
    causal = (getattr(self, "_attention_dir_override", None) or self.cfg.attention_dir) == "causal"
    call = AttentionCall(
        module=self,
        layer=seam.layer,
        q=q,
        k=k,
        v=v,
        causal=causal,
        past_kv_pos_offset=offset,
        attention_mask=attention_mask,
        additive_attention_mask=additive_attention_mask,
        state=seam.state,
    )
    z = get_plugin_manager().hook.tl_plugins_attention(call=call)
    z = self.hook_z(z)
    return _output_projection(self, z)


def _output_projection(self, z: torch.Tensor) -> torch.Tensor:
    """TransformerLens's W_O projection, with ``hook_result`` when ``use_attn_result`` is set."""
    if not self.cfg.use_attn_result:
        w = einops.rearrange(
            self.W_O, "head_index d_head d_model -> d_model (head_index d_head)"
        ).contiguous()
        if w.device != z.device:
            w = w.to(z.device)
        b_O = self.b_O
        if b_O.device != z.device:
            b_O = b_O.to(z.device)
        if z.dtype != w.dtype:
            z = z.to(w.dtype)
        z = z.reshape(z.shape[0], z.shape[1], self.cfg.d_head * self.cfg.n_heads)
        if z.device.type == "mps":
            return torch.matmul(z, w.T) + b_O
        return F.linear(z, w, b_O)
    w = einops.rearrange(self.W_O, "head_index d_head d_model -> 1 1 head_index d_head d_model")
    if w.device != z.device:
        w = w.to(z.device)
    if z.dtype != w.dtype:
        z = z.to(w.dtype)
    z = einops.rearrange(z, "batch pos head_index d_head -> batch pos head_index d_head 1")
    result = self.hook_result((z * w).sum(-2))
    return einops.reduce(result, "batch position index model->batch position model", "sum") + self.b_O


@dataclass
class _Seam:
    layer: int
    state: ModelState


def install_attention_seam(model: Any, backend: Any) -> None:
    """Install the attention seam on every attention module of ``model`` (idempotent)."""
    state = get_state(model, create=True)
    if state.overrides.get(SEAM_OWNER_ATTN):
        return
    check_attention_supported(backend.cfg, "attention seam")
    for layer, attn in backend.attention_modules():
        set_instance_attr(model, SEAM_OWNER_ATTN, attn, "_tl_plugins_seam", _Seam(layer, state))
        set_instance_attr(model, SEAM_OWNER_ATTN, attn, "forward", types.MethodType(_seam_forward, attn))


# ------------------------------------------------------------------------------------------------
# The MLP activation seam
# ------------------------------------------------------------------------------------------------


class _SeamActFn:
    """Callable put in place of an MLP's ``act_fn``; asks ``tl_plugins_mlp_activation`` first."""

    def __init__(self, mlp: Any, layer: int, original: Callable, state: ModelState):
        self.mlp = mlp
        self.layer = layer
        self.original = original
        self.state = state

    def __call__(self, pre: torch.Tensor) -> torch.Tensor:
        call = MLPActivationCall(self.mlp, self.layer, pre, self.original, self.state)
        out = get_plugin_manager().hook.tl_plugins_mlp_activation(call=call)
        return self.original(pre) if out is None else out


def install_mlp_seam(model: Any, backend: Any) -> None:
    """Wrap ``act_fn`` of every MLP of ``model`` (idempotent)."""
    state = get_state(model, create=True)
    if state.overrides.get(SEAM_OWNER_MLP):
        return
    for layer, mlp in backend.mlp_modules():
        original = getattr(mlp, "act_fn", None)
        if original is None:
            raise UnsupportedModelError(
                f"MLP seam: blocks.{layer}.mlp ({type(mlp).__name__}) has no act_fn; "
                "accepted: TransformerLens MLP and GatedMLP."
            )
        set_instance_attr(model, SEAM_OWNER_MLP, mlp, "act_fn", _SeamActFn(mlp, layer, original, state))
