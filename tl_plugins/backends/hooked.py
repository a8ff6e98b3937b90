"""The ``hooked`` backend: HookedTransformer and HookedSAETransformer (transformer-lens 3.x).

Attention seam: a per-instance ``forward`` on every ``AbstractAttention`` module that runs
TransformerLens's own q/k/v projection, KV cache and rotary steps (every hook point fires), asks
``tl_plugins_attention`` for z, then fires ``hook_z`` and does TransformerLens's output projection
(``hook_result`` when ``use_attn_result``). MLP seam: a per-instance ``act_fn``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import einops
import torch
import torch.nn.functional as F

from tl_plugins.backends.base import Backend
from tl_plugins.errors import UnsupportedModelError
from tl_plugins.processing import infer_processing, record_processing
from tl_plugins.seams import SEAM_OWNER_ATTN, SEAM_OWNER_MLP, AttentionCall, SeamActFn, ask_attention
from tl_plugins.state import BoundMethod, ModelState, set_instance_attr


def _hooked_transformer_class():
    """HookedTransformer, or None on transformer-lens 4.x (which removed it).

    Looked up lazily: a model can only be a HookedTransformer if transformer_lens was imported, and
    importing it takes seconds, which ``tl-plugins --help`` should not pay.
    """
    if "transformer_lens" not in sys.modules:
        return None
    try:
        from transformer_lens import HookedTransformer
    except ImportError:  # transformer-lens 4.x
        return None
    return HookedTransformer


@dataclass
class HookedAttentionCall(AttentionCall):
    """An attention call of a HookedTransformer ``AbstractAttention`` module."""

    @property
    def scale(self) -> float:
        return 1.0 / float(self.module.attn_scale)

    @property
    def attn_scale(self) -> float:
        return float(self.module.attn_scale)

    @property
    def softcap(self) -> Optional[float]:
        cap = getattr(self.module.cfg, "attn_scores_soft_cap", None)
        return cap if cap is not None and cap > 0 else None

    @property
    def window_size(self) -> Optional[int]:
        if getattr(self.module, "attn_type", "global") == "local":
            return int(self.module.cfg.window_size)
        return None

    @property
    def custom_mask(self) -> bool:
        return self.additive_attention_mask is not None

    def dense_scores(self) -> torch.Tensor:
        m = self.module
        scores = m.calculate_attention_scores(self.q, self.k)
        if self.causal:
            scores = m.apply_causal_mask(scores, self.past_kv_pos_offset, self.attention_mask)
        if self.additive_attention_mask is not None:
            scores += self.additive_attention_mask
        return scores


_UNSUPPORTED_ATTENTION = {
    "load_in_4bit": "4-bit quantised weights",
    "use_attention_sinks": "attention sinks",
    "use_logn_attn": "log-n attention scaling",
    "clip_qkv": "q/k/v clipping",
}


def check_hooked_attention(cfg: Any, plugin: str) -> None:
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
                f"attention seam; it needs cfg.{attr} unset."
            )
    arch = getattr(cfg, "original_architecture", None)
    if arch in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        raise UnsupportedModelError(
            f"plugin {plugin!r}: model architecture {arch!r} (QK-norm before the head split) is not "
            "supported by the attention seam."
        )


def _seam_forward(self, query_input, key_input, value_input, past_kv_cache_entry=None,
                  additive_attention_mask=None, attention_mask=None, position_bias=None):
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
    call = HookedAttentionCall(
        module=self, layer=seam.layer, q=q, k=k, v=v, causal=causal, past_kv_pos_offset=offset,
        attention_mask=attention_mask, additive_attention_mask=additive_attention_mask, state=seam.state,
    )
    z = self.hook_z(ask_attention(call))
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


class HookedBackend(Backend):
    """HookedTransformer: ``blocks[l].attn``, ``blocks[l].mlp``, ``ln_final``, ``unembed``."""

    name = "hooked"

    @classmethod
    def accepts(cls, model: Any) -> bool:
        ht = _hooked_transformer_class()
        return ht is not None and isinstance(model, ht)

    @classmethod
    def describe(cls) -> str:
        return "HookedTransformer / HookedSAETransformer (transformer-lens 3.x)"

    # -- modules and seams -----------------------------------------------------------------------
    def attention_modules(self) -> list[tuple[int, Any]]:
        return [(i, block.attn) for i, block in enumerate(self.model.blocks)]

    def mlp_modules(self) -> list[tuple[int, Any]]:
        out = []
        for i, block in enumerate(self.model.blocks):
            mlp = getattr(block, "mlp", None)
            if mlp is not None:
                out.append((i, mlp))
        return out

    def check_attention_supported(self, plugin: str) -> None:
        check_hooked_attention(self.cfg, plugin)

    def install_attention_seam(self, model_state: ModelState) -> None:
        for layer, attn in self.attention_modules():
            set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, "_tl_plugins_seam", _Seam(layer, model_state))
            set_instance_attr(self.model, SEAM_OWNER_ATTN, attn, "forward", BoundMethod(_seam_forward, attn))

    def install_mlp_seam(self, model_state: ModelState) -> None:
        for layer, mlp in self.mlp_modules():
            original = getattr(mlp, "act_fn", None)
            if original is None:
                raise UnsupportedModelError(
                    f"MLP seam: blocks.{layer}.mlp ({type(mlp).__name__}) has no act_fn; "
                    "accepted: TransformerLens MLP and GatedMLP."
                )
            set_instance_attr(self.model, SEAM_OWNER_MLP, mlp, "act_fn",
                              SeamActFn(mlp, layer, original, model_state))

    # -- readouts --------------------------------------------------------------------------------
    def final_norm(self, resid: torch.Tensor) -> torch.Tensor:
        if getattr(self.cfg, "normalization_type", None) is None:
            return resid
        return self.model.ln_final(resid)

    def unembed(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.unembed(x)

    def attention_input_hook(self, layer: int):
        layer = self.check_layer(layer)
        return f"blocks.{layer}.ln1.hook_normalized", lambda x: self._ln1_affine(layer, x)

    def _ln1_affine(self, layer: int, normalized: torch.Tensor) -> torch.Tensor:
        ln = self.model.blocks[layer].ln1
        out = normalized
        w = getattr(ln, "w", None)
        if w is not None:
            out = out * w
        b = getattr(ln, "b", None)
        if b is not None:
            out = out + b
        return out

    def attention_scores_from_qk(self, layer: int):
        layer = self.check_layer(layer)
        attn = self.model.blocks[layer].attn
        rotary = self.cfg.positional_embedding_type == "rotary"
        q_kind, k_kind = ("rot_q", "rot_k") if rotary else ("q", "k")
        # TransformerLens's own step: q.k / attn_scale, soft-cap, grouped K expanded (GQA)
        return (self.hook_name(q_kind, layer), self.hook_name(k_kind, layer),
                lambda q, k: attn.calculate_attention_scores(q, k))

    # -- weights ---------------------------------------------------------------------------------
    def weight(self, name: str, layer: Optional[int] = None) -> Optional[torch.Tensor]:
        m = self.model
        if name == "W_E":
            return m.W_E
        if name == "W_U":
            return m.W_U
        if name == "b_U":
            b = getattr(m.unembed, "b_U", None)
            return b if b is not None else torch.zeros(self.d_vocab, dtype=m.W_U.dtype, device=m.W_U.device)
        if name == "W_pos":
            return m.W_pos if self.cfg.positional_embedding_type in ("standard", "shortformer") else None
        if name == "ln_final_w":
            return getattr(getattr(m, "ln_final", None), "w", None)
        block = m.blocks[self.check_layer(layer)]
        if name in ("W_Q", "W_K", "W_V", "W_O"):
            return getattr(block.attn, name)  # GroupedQueryAttention.W_K/W_V expand
        if name in ("b_Q", "b_K", "b_V", "b_O"):
            b = getattr(block.attn, name, None)
            if b is not None:
                return b
            shape = (self.d_model,) if name == "b_O" else (self.n_heads, self.d_head)
            return torch.zeros(shape, dtype=block.attn.W_Q.dtype, device=block.attn.W_Q.device)
        if name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
            if self.attn_only:
                raise UnsupportedModelError("model: attention-only model (cfg.attn_only=True) has no MLP weights")
            mlp = block.mlp
            value = getattr(mlp, name, None)
            if value is not None or name == "W_gate":
                return value
            size = self.d_mlp if name == "b_in" else self.d_model
            return torch.zeros(size, dtype=mlp.W_in.dtype, device=mlp.W_in.device)
        raise KeyError(f"name: unknown weight {name!r}")

    def processing(self) -> Any:
        return infer_processing(self.model, self)

    # -- training --------------------------------------------------------------------------------
    def attention_parameters(self, layer: int, letter: str) -> dict[str, torch.nn.Parameter]:
        layer = self.check_layer(layer)
        named = self.named_parameters()
        out = {}
        for kind in ("W", "b"):
            for prefix in ("", "_"):  # GroupedQueryAttention keeps K/V as _W_K, _b_K
                name = f"blocks.{layer}.attn.{prefix}{kind}_{letter.upper()}"
                if name in named:
                    out[name] = named[name]
        return out

    def layer_of(self, parameter_name: str) -> Optional[int]:
        parts = parameter_name.split(".")
        if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
            return int(parts[1])
        return None

    def untrained_copy(self, *, seed: int, keep_embeddings: bool) -> Any:
        from transformer_lens import HookedTransformer

        model = self.model
        cfg = copy.deepcopy(model.cfg)
        cfg.seed = None  # HookedTransformerConfig(seed=...) would reseed the global RNG
        cfg.init_weights = True  # a cfg built for loading may say False: torch.empty would stay garbage
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            tok = getattr(model, "tokenizer", None)
            kw = {"default_padding_side": "right"} if tok is not None else {}
            new = HookedTransformer(cfg, tokenizer=tok, move_to_device=False, **kw)
        new.to(cfg.device, print_details=False)
        if keep_embeddings:
            src = dict(model.named_parameters())
            with torch.no_grad():
                for name, p in new.named_parameters():
                    if (name.startswith(("embed.", "pos_embed.", "unembed.", "ln_final."))
                            or ".ln1." in name or ".ln2." in name):
                        p.copy_(src[name])
        new.eval()
        record_processing(new, fold_ln=False, center_writing_weights=False, center_unembed=False,
                          fold_value_biases=False)
        return new

    # -- running ---------------------------------------------------------------------------------
    def run(self, tokens: torch.Tensor, *, params: Optional[dict[str, torch.Tensor]] = None,
            stop_at_layer: Optional[int] = None, kv_cache: Any = None) -> torch.Tensor:
        kw: dict[str, Any] = {}
        if stop_at_layer is not None:
            kw["stop_at_layer"] = stop_at_layer
        if kv_cache is not None:
            kw["past_kv_cache"] = kv_cache
            kw["attention_mask"] = torch.ones_like(tokens)
        return self.functional_call(params, tokens, **kw)

    @staticmethod
    def _kv_cache_classes():
        try:
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache as Cache
            from transformer_lens.cache.key_value_cache_entry import (
                TransformerLensKeyValueCacheEntry as Entry,
            )
        except ImportError:  # older transformer-lens names
            from transformer_lens.past_key_value_caching import (  # type: ignore
                HookedTransformerKeyValueCache as Cache,
            )
            from transformer_lens.past_key_value_caching import (  # type: ignore
                HookedTransformerKeyValueCacheEntry as Entry,
            )
        return Cache, Entry

    def prefix_cache(self, tokens: Sequence[int], params: Optional[dict[str, torch.Tensor]] = None) -> Any:
        Cache, _ = self._kv_cache_classes()
        cache = Cache.init_cache(self.cfg, self.cfg.device, 1)
        toks = torch.tensor([list(tokens)], dtype=torch.long, device=self.cfg.device)
        with torch.no_grad():
            self.functional_call(params, toks, past_kv_cache=cache, attention_mask=torch.ones_like(toks))
        cache.freeze()
        return cache

    def expand_cache(self, cache: Any, batch: int) -> Any:
        Cache, Entry = self._kv_cache_classes()
        entries = [Entry(e.past_keys.expand(batch, -1, -1, -1), e.past_values.expand(batch, -1, -1, -1),
                         frozen=True) for e in cache.entries]
        return Cache(entries, cache.previous_attention_mask.expand(batch, -1), frozen=True)


__all__ = ["HookedBackend", "HookedAttentionCall", "check_hooked_attention"]
