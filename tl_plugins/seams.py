"""Method seams: where plugins change a model's forward pass without replacing modules.

The host installs, once per attention module, per-instance attributes (set by the model's backend,
see ``tl_plugins.backends``) that run the library's own attention steps (q/k/v projection, KV cache,
rotary, every hook point) and ask the ``tl_plugins_attention`` hook for the mix ``z``. The host's
``trylast`` implementation is the model's own dense attention, reproduced operation for operation
by the backend's :class:`AttentionCall`, so a model whose plugins all pass computes bit-identical
outputs. The MLP seam wraps the activation function the same way for ``tl_plugins_mlp_activation``.

Nothing here is a hook on a hook point: SAELens replaces hook-point modules to attach SAEs, and
the seam looks hook points up by attribute at call time, so an attached SAE keeps firing.
Deleting the instance attributes (``tl_plugins.disable``) restores the class methods.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int

from tl_plugins.plugins import get_plugin_manager
from tl_plugins.state import ModelState, get_state, running

SEAM_OWNER_ATTN = "__attention_seam__"
SEAM_OWNER_MLP = "__mlp_seam__"


@dataclass
class AttentionCall:
    """One call of an attention module, as seen by ``tl_plugins_attention`` implementations.

    Shapes (TransformerLens layout and dimension names):
        q: [batch, query_pos, head_index, d_head], post-rotary (what ``hook_rot_q`` produced).
        k, v: [batch, key_pos, kv_head_index, d_head], post-rotary, grouped-query K/V not expanded.
        attention_mask: [batch, key_pos] int (1 = real token) or None.
        additive_attention_mask: broadcastable to [batch, 1, 1, key_pos] or None.
    Query i sits at absolute key position ``past_kv_pos_offset + i``.

    ``custom_mask`` is True when the call's mask is not causal + sliding window + key padding (a
    mask a user built by hand, packed sequences): only the dense route reproduces it then.
    Backends subclass this and implement :meth:`dense_scores`, the scale/soft-cap/window facts and
    :meth:`_softmax`; the rest is shared.
    """

    module: Any
    layer: int
    q: Float[torch.Tensor, "batch query_pos head_index d_head"]
    k: Float[torch.Tensor, "batch key_pos kv_head_index d_head"]
    v: Float[torch.Tensor, "batch key_pos kv_head_index d_head"]
    causal: bool
    past_kv_pos_offset: int
    attention_mask: Optional[Int[torch.Tensor, "batch key_pos"]]
    additive_attention_mask: Optional[Float[torch.Tensor, "batch 1 1 key_pos"]]
    state: Optional[ModelState]

    # -- facts (backends override) -------------------------------------------------------------
    @property
    def scale(self) -> float:
        """Multiplier of q.k."""
        raise NotImplementedError

    @property
    def attn_scale(self) -> float:
        """TransformerLens divides q.k by this: ``1 / scale``."""
        return 1.0 / self.scale

    @property
    def softcap(self) -> Optional[float]:
        """Attention-score soft-cap c (scores -> c tanh(s / c)), or None."""
        return None

    @property
    def window_size(self) -> Optional[int]:
        """Sliding-window size for local attention layers, else None."""
        return None

    @property
    def custom_mask(self) -> bool:
        return False

    @property
    def n_heads(self) -> int:
        return self.q.shape[2]

    @property
    def n_kv_heads(self) -> int:
        return self.k.shape[2]

    @property
    def key_padding_mask(self) -> Optional[Bool[torch.Tensor, "batch key_pos"]]:
        """[batch, key_pos] bool, True where the key is a real token; None if there is no padding."""
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

    def hook_attn_scores(self, scores: Float[torch.Tensor, "batch head_index query_pos key_pos"]
                         ) -> Float[torch.Tensor, "batch head_index query_pos key_pos"]:
        return self.module.hook_attn_scores(scores)

    def hook_pattern(self, pattern: Float[torch.Tensor, "batch head_index query_pos key_pos"]
                     ) -> Float[torch.Tensor, "batch head_index query_pos key_pos"]:
        return self.module.hook_pattern(pattern)

    # -- the dense reference, step by step -----------------------------------------------------
    def dense_scores(self) -> Float[torch.Tensor, "batch head_index query_pos key_pos"]:
        """Scaled, soft-capped, masked scores [batch, head_index, query_pos, key_pos], as the library computes
        them (masked entries -inf or the library's large negative value)."""
        raise NotImplementedError

    def _softmax(self, scores: Float[torch.Tensor, "batch head_index query_pos key_pos"]
                 ) -> Float[torch.Tensor, "batch head_index query_pos key_pos"]:
        """The library's softmax of (hooked) scores into a pattern, before ``hook_pattern``."""
        pattern = F.softmax(scores, dim=-1)
        return torch.where(torch.isnan(pattern), torch.zeros_like(pattern), pattern)

    def dense_z(self, pattern: Float[torch.Tensor, "batch head_index query_pos key_pos"]
                ) -> Float[torch.Tensor, "batch query_pos head_index d_head"]:
        """``pattern @ v`` as [batch, query_pos, head_index, d_head] (before ``hook_z``)."""
        v = self.v
        if v.shape[2] != pattern.shape[1]:
            v = torch.repeat_interleave(v, dim=2, repeats=pattern.shape[1] // v.shape[2])
        v_ = einops.rearrange(v, "batch key_pos head_index d_head -> batch head_index key_pos d_head")
        return einops.rearrange(
            pattern @ v_, "batch head_index query_pos d_head -> batch query_pos head_index d_head"
        )

    def dense(self, scores_transform: Optional[Callable[[Float[torch.Tensor, "batch head_index query_pos key_pos"]],
                                                        Float[torch.Tensor, "batch head_index query_pos key_pos"]]] = None
              ) -> Float[torch.Tensor, "batch query_pos head_index d_head"]:
        """The library's dense attention; ``scores_transform`` edits scores after the hook."""
        scores = self.hook_attn_scores(self.dense_scores())
        if scores_transform is not None:
            scores = scores_transform(scores)
        pattern = self.hook_pattern(self._softmax(scores))
        pattern = pattern.to(device=self.v.device, dtype=self.v.dtype)
        return self.dense_z(pattern)


def _has_hooks(hook_point: Any) -> bool:
    has = getattr(hook_point, "has_hooks", None)
    if has is not None:
        return bool(has())
    return bool(getattr(hook_point, "fwd_hooks", None) or getattr(hook_point, "_forward_hooks", None))


def ask_attention(call: AttentionCall) -> Float[torch.Tensor, "batch query_pos head_index d_head"]:
    """The ``tl_plugins_attention`` hook's z for ``call`` (the built-in dense one if all pass)."""
    with running(call.state):
        return get_plugin_manager().hook.tl_plugins_attention(call=call)


@dataclass
class MLPActivationCall:
    """One activation call of an MLP. ``pre``: [batch, pos, d_mlp], the output of ``hook_pre``."""

    module: Any
    layer: int
    pre: Float[torch.Tensor, "batch pos d_mlp"]
    act_fn: Callable[[Float[torch.Tensor, "batch pos d_mlp"]], Float[torch.Tensor, "batch pos d_mlp"]]
    state: Optional[ModelState]

    def config(self, name: str) -> Any:
        return None if self.state is None else self.state.config(name)


class SeamActFn:
    """Callable put in place of an MLP's activation; asks ``tl_plugins_mlp_activation`` first."""

    def __init__(self, mlp: Any, layer: int, original: Callable, state: ModelState):
        self.mlp = mlp
        self.layer = layer
        self.original = original
        self.state = state

    def __call__(self, pre: Float[torch.Tensor, "batch pos d_mlp"]
                 ) -> Float[torch.Tensor, "batch pos d_mlp"]:
        call = MLPActivationCall(self.mlp, self.layer, pre, self.original, self.state)
        with running(self.state):
            out = get_plugin_manager().hook.tl_plugins_mlp_activation(call=call)
        return self.original(pre) if out is None else out


def install_attention_seam(model: Any, backend: Any, plugin: str = "attention seam") -> None:
    """Install the attention seam on every attention module of ``model`` (idempotent); ``plugin``
    (the plugin asking for it) is named when the model's attention is refused."""
    state = get_state(model, create=True)
    if state.overrides.get(SEAM_OWNER_ATTN):
        return
    backend.check_attention_supported(plugin)
    backend.install_attention_seam(state)


def install_mlp_seam(model: Any, backend: Any) -> None:
    """Wrap the activation of every MLP of ``model`` (idempotent)."""
    state = get_state(model, create=True)
    if state.overrides.get(SEAM_OWNER_MLP):
        return
    backend.install_mlp_seam(state)
