"""The backend interface: everything a plugin may ask of a model, in one abstract class.

A plugin never touches ``model.blocks[...]``, TransformerLens classes or parameter-name prefixes;
it asks the model's :class:`Backend` (``tl_plugins.backends.detect(model)``). ``hooked.py``
(HookedTransformer, TransformerLens 3.x) and ``bridge.py`` (TransformerBridge, 3.x and 4.x)
implement it; a new model family is one new file that subclasses :class:`Backend` and is passed
to ``tl_plugins.backends.register_backend``.

What a backend provides:

* facts: sizes (``n_layers``, ``n_heads``, ``n_kv_heads``, ``d_model``, ``d_head``, ``d_mlp``,
  ``d_vocab``, ``n_ctx``), ``device``, ``dtype``, ``gated_mlp``, ``act_fn``;
* the seams: ``attention_modules()`` / ``mlp_modules()`` and ``install_attention_seam`` /
  ``install_mlp_seam``, which set per-instance attributes through ``tl_plugins.state`` (so the
  host removes them on disable) and build :class:`tl_plugins.seams.AttentionCall` objects;
* hook names: ``hook_name(kind, layer)`` for the kinds in :data:`HOOK_KINDS`; ``has_hook(name)`` and
  ``hooks(fwd_hooks)``, a context manager that adds forward hooks by name for one block (an unknown
  name is an error on every backend);
* readouts: ``final_norm(resid)``, ``unembed(x)`` and ``readout(resid)`` (logits of residual vectors);
  ``attention_input_hook(layer)`` and ``attention_scores_from_qk(layer)`` (pre-softmax scores rebuilt
  from the query/key hook points);
* weights: ``weight(name, layer)`` in TransformerLens layout, grouped K/V expanded, absent biases as
  zeros (``tl_plugins.weights`` builds its read-only view on it) and ``processing()``;
* training: ``attention_parameters(layer, letter)`` (name -> trainable tensor) and
  ``functional_call(params, *args, **kwargs)``, which never modifies the model;
* running: ``run(tokens, stop_at_layer=..., kv_cache=..., attention_mask=...)``, a KV cache
  (``prefix_cache`` / ``expand_cache``) and ``generate``;
* text: ``tokenizer``, ``default_prepend_bos``, ``bos_token_id``, ``to_tokens(text)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch
from jaxtyping import Float, Int

from tl_plugins.checks import check_index
from tl_plugins.errors import UnsupportedModelError

#: The hook kinds every backend names. Per-layer kinds take a layer; ``embed`` and ``final`` do not.
HOOK_KINDS = (
    "resid_pre", "resid_mid", "resid_post", "attn_in", "attn_out", "mlp_in", "mlp_out",
    "mlp_pre", "mlp_post", "q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z",
    "ln1_normalized", "ln2_normalized", "ln_final_normalized",
)

def rms_norm_multiplier(norm: Callable[[torch.Tensor], torch.Tensor], d_model: int, *, eps: float,
                        dtype: torch.dtype = torch.float32, device: Any = "cpu") -> torch.Tensor:
    """The per-feature multiplier ``w`` [d_model] (float32, CPU) of an RMS norm ``norm``, read by
    probing it with a constant vector, where the scale is known: ``norm(c * 1) = w * c / sqrt(c^2 +
    eps)``. Independent of how the module stores its weight (Gemma's ``w - 1``, TransformerLens's
    converted ``w``)."""
    c = 1e3
    with torch.no_grad():
        out = norm(torch.full((1, d_model), c, dtype=dtype, device=device))[0].float().cpu()
    return out * (c * c + eps) ** 0.5 / c


#: Names accepted by :meth:`Backend.weight`, with their shapes (H = query heads, expanded).
WEIGHT_NAMES = {
    "W_E": "[d_vocab, d_model]", "W_U": "[d_model, d_vocab]", "b_U": "[d_vocab]",
    "W_pos": "[n_ctx, d_model] or None (no learned positions)",
    "W_Q": "[H, d_model, d_head]", "W_K": "[H, d_model, d_head]", "W_V": "[H, d_model, d_head]",
    "W_O": "[H, d_head, d_model]", "b_Q": "[H, d_head]", "b_K": "[H, d_head]", "b_V": "[H, d_head]",
    "b_O": "[d_model]", "W_in": "[d_model, d_mlp]", "W_gate": "[d_model, d_mlp] or None",
    "W_out": "[d_mlp, d_model]", "b_in": "[d_mlp]", "b_out": "[d_model]",
    "ln_final_w": "[d_model] or None (folded or absent)",
}
PER_LAYER_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O",
                     "W_in", "W_gate", "W_out", "b_in", "b_out")


class Backend(ABC):
    """One model family's answers to what plugins ask (see the module docstring).

    Subclasses set ``name`` and implement the abstract methods; the concrete ones here are written
    in terms of those and of ``cfg``. A backend object is cheap: it holds the model and nothing
    else, so ``detect(model)`` may be called on every enable.
    """

    name: ClassVar[str] = "abstract"

    def __init__(self, model: Any):
        self.model = model

    # -- recognising a model ---------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def accepts(cls, model: Any) -> bool:
        """True when this backend knows ``model``'s class. Must not import heavy modules."""

    @classmethod
    def describe(cls) -> str:
        """One line for error messages listing the supported model types."""
        return cls.name

    # -- facts -------------------------------------------------------------------------------------
    @property
    def cfg(self) -> Any:
        """The model's TransformerLens-style config (``HookedTransformerConfig`` or the bridge's)."""
        return self.model.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.cfg, "n_key_value_heads", None) or self.cfg.n_heads)

    @property
    def d_model(self) -> int:
        return int(self.cfg.d_model)

    @property
    def d_head(self) -> int:
        return int(self.cfg.d_head)

    @property
    def attn_only(self) -> bool:
        return bool(getattr(self.cfg, "attn_only", False))

    @property
    def d_mlp(self) -> Optional[int]:
        return None if self.attn_only else int(self.cfg.d_mlp)

    @property
    def d_vocab(self) -> int:
        return int(self.cfg.d_vocab)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def device(self) -> torch.device:
        return torch.device(self.cfg.device)

    @property
    def dtype(self) -> torch.dtype:
        return self.cfg.dtype

    @property
    def gated_mlp(self) -> bool:
        return bool(getattr(self.cfg, "gated_mlp", False))

    @property
    def act_fn(self) -> str:
        return str(getattr(self.cfg, "act_fn", ""))

    @property
    def normalized(self) -> bool:
        """True when the model normalises the residual stream before attention/MLP/unembedding."""
        return getattr(self.cfg, "normalization_type", None) is not None

    @property
    def output_logits_soft_cap(self) -> Optional[float]:
        cap = getattr(self.cfg, "output_logits_soft_cap", None)
        return float(cap) if cap is not None and cap > 0 else None

    # -- modules and seams -----------------------------------------------------------------------
    @abstractmethod
    def attention_modules(self) -> list[tuple[int, Any]]:
        """(layer, attention module) for every block."""

    @abstractmethod
    def mlp_modules(self) -> list[tuple[int, Any]]:
        """(layer, MLP module) for every block that has one."""

    @abstractmethod
    def check_attention_supported(self, plugin: str) -> None:
        """Raise ``UnsupportedModelError`` naming the attention class and ``plugin`` if the seam
        cannot reproduce this model's attention."""

    @abstractmethod
    def install_attention_seam(self, model_state: Any) -> None:
        """Set the per-instance attributes that route every attention call through
        ``tl_plugins_attention``; every attribute is set with ``tl_plugins.state.set_instance_attr``
        under ``tl_plugins.seams.SEAM_OWNER_ATTN`` so the host can remove it."""

    @abstractmethod
    def install_mlp_seam(self, model_state: Any) -> None:
        """Likewise for every MLP's activation (``tl_plugins_mlp_activation``), owner ``SEAM_OWNER_MLP``."""

    # -- hook names ------------------------------------------------------------------------------
    def hook_name(self, kind: str, layer: Optional[int] = None) -> str:
        """The hook-point name of ``kind`` (see :data:`HOOK_KINDS`) at ``layer``.

        Both TransformerLens backends accept the HookedTransformer names (the bridge aliases them),
        so the default is those names; a backend whose names differ overrides this.
        """
        names = {
            "resid_pre": "blocks.{l}.hook_resid_pre", "resid_mid": "blocks.{l}.hook_resid_mid",
            "resid_post": "blocks.{l}.hook_resid_post", "attn_in": "blocks.{l}.hook_attn_in",
            "attn_out": "blocks.{l}.hook_attn_out", "mlp_in": "blocks.{l}.hook_mlp_in",
            "mlp_out": "blocks.{l}.hook_mlp_out", "mlp_pre": "blocks.{l}.mlp.hook_pre",
            "mlp_post": "blocks.{l}.mlp.hook_post", "q": "blocks.{l}.attn.hook_q",
            "k": "blocks.{l}.attn.hook_k", "v": "blocks.{l}.attn.hook_v",
            "rot_q": "blocks.{l}.attn.hook_rot_q", "rot_k": "blocks.{l}.attn.hook_rot_k",
            "attn_scores": "blocks.{l}.attn.hook_attn_scores", "pattern": "blocks.{l}.attn.hook_pattern",
            "z": "blocks.{l}.attn.hook_z", "ln1_normalized": "blocks.{l}.ln1.hook_normalized",
            "ln2_normalized": "blocks.{l}.ln2.hook_normalized",
            "ln_final_normalized": "ln_final.hook_normalized",
        }
        if kind not in names:
            raise ValueError(f"kind: got {kind!r}; accepted: {', '.join(HOOK_KINDS)}")
        template = names[kind]
        if "{l}" in template:
            layer = self.check_layer(layer)
            return template.format(l=layer)
        return template

    def has_hook(self, name: str) -> bool:
        """True when ``name`` is a hook point of this model (aliases included)."""
        return name in self.model.hook_dict

    @contextmanager
    def hooks(self, fwd_hooks: Sequence[tuple[str, Callable[..., Any]]]) -> Iterator[None]:
        """Add forward hooks ``(hook name, fn(tensor, hook) -> tensor or None)`` for the block; they are
        removed on exit, even on error. An unknown name raises ``KeyError`` naming it (TransformerLens
        3.x's bridge would silently skip it). Hook functions should not rely on ``hook.name``: the
        bridge reports the canonical name of an aliased hook point."""
        fwd_hooks = list(fwd_hooks)
        known = self.model.hook_dict
        for name, _ in fwd_hooks:
            if name not in known:
                raise KeyError(f"hook name: got {name!r}, which is not a hook point of this "
                               f"{type(self.model).__name__}")
        with self.model.hooks(fwd_hooks=fwd_hooks):
            yield

    def check_layer(self, layer: Any, arg: str = "layer") -> int:
        """``layer`` as an int in [0, n_layers), or ``IndexError`` naming ``arg``."""
        return check_index(layer, self.n_layers, arg)

    # -- readouts --------------------------------------------------------------------------------
    @abstractmethod
    def final_norm(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_model"]:
        """The final norm applied to residual vectors [..., d_model] (identity when there is none)."""

    def output_norm(self, kind: str, layer: int
                    ) -> Optional[Callable[[Float[torch.Tensor, "... d_model"]], Float[torch.Tensor, "... d_model"]]]:
        """The norm a block applies to its attention (``kind="attn"``) or MLP (``kind="mlp"``) output
        before adding it to the residual (Gemma 2/3's ``ln1_post`` / ``ln2_post``), as a function of
        vectors [..., d_model]; None for the usual pre-norm-only block.

        Both TransformerLens backends name these modules ``ln1_post`` and ``ln2_post`` on each block;
        a backend whose models differ overrides this."""
        if kind not in ("attn", "mlp"):
            raise ValueError(f"kind: got {kind!r}; accepted: 'attn' or 'mlp'")
        block = self.model.blocks[self.check_layer(layer)]
        return block._modules.get("ln1_post" if kind == "attn" else "ln2_post")

    @abstractmethod
    def unembed(self, x: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits [..., d_vocab] of normalised vectors [..., d_model] (unembedding + its bias)."""

    def readout(self, resid: Float[torch.Tensor, "... d_model"]) -> Float[torch.Tensor, "... d_vocab"]:
        """Logits of residual vectors [..., d_model]: final norm, unembedding, output soft-cap."""
        logits = self.unembed(self.final_norm(resid))
        cap = self.output_logits_soft_cap
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        return logits

    @abstractmethod
    def attention_input_hook(self, layer: int
                             ) -> tuple[str, Callable[[Float[torch.Tensor, "... d_model"]], Float[torch.Tensor, "... d_model"]]]:
        """(hook name, function): the function maps what that hook point carries [..., d_model] to the
        input of ``layer``'s attention (after ``ln1``, its learned scale included)."""

    def attention_scores_from_qk(self, layer: int) -> tuple[
            str, str, Callable[[Float[torch.Tensor, "batch query_pos head_index d_head"],
                                Float[torch.Tensor, "batch key_pos kv_head_index d_head"]],
                               Float[torch.Tensor, "batch head_index query_pos key_pos"]]]:
        """(query hook name, key hook name, function): the function maps what those hook points carry,
        q [batch, query_pos, head_index, d_head] and k [batch, key_pos, kv_head_index, d_head] (after
        rotary when the model has it), to ``layer``'s attention scores [batch, head_index, query_pos,
        key_pos] as the model
        forms them before the mask and the softmax (scale and soft-cap included, grouped K expanded).
        For checking or replacing ``hook_attn_scores`` where it does not hold pre-softmax scores."""
        raise UnsupportedModelError(
            f"model: the {self.name} backend cannot rebuild attention scores from its query/key hooks")

    # -- weights ---------------------------------------------------------------------------------
    @abstractmethod
    def weight(self, name: str, layer: Optional[int] = None) -> Optional[torch.Tensor]:
        """Weight ``name`` (see :data:`WEIGHT_NAMES`) of ``layer``, TransformerLens layout, grouped K/V
        expanded to one entry per query head, an absent bias as zeros. May share storage with the
        model: callers that hand it out detach and clone it."""

    @abstractmethod
    def processing(self) -> Any:
        """A :class:`tl_plugins.processing.Processing` saying how the weights were processed."""

    # -- training --------------------------------------------------------------------------------
    @abstractmethod
    def attention_parameters(self, layer: int, letter: str) -> dict[str, torch.nn.Parameter]:
        """Name -> trainable parameter of projection ``letter`` ("q", "k", "v" or "o") in ``layer``:
        its weight first, then its bias if it has one. Names are the model's ``named_parameters``
        names (what ``functional_call`` takes). Empty when the projection does not exist."""

    def named_parameters(self) -> dict[str, torch.nn.Parameter]:
        return dict(self.model.named_parameters())

    def layer_of(self, parameter_name: str) -> Optional[int]:
        """The layer a parameter name belongs to, or None (embeddings, final norm)."""
        for layer in range(self.n_layers):
            for letter in "qkvo":
                if parameter_name in self.attention_parameters(layer, letter):
                    return layer
        return None

    def functional_call(self, params: Optional[dict[str, torch.Tensor]], *args: Any, **kwargs: Any) -> Any:
        """``model(*args, **kwargs)`` with the named parameters replaced; the model is never modified."""
        if not params:
            return self.model(*args, **kwargs)
        return torch.func.functional_call(self.model, params, args, kwargs, strict=False)

    @abstractmethod
    def untrained_copy(self, *, seed: int, keep_embeddings: bool) -> Any:
        """A model of the same architecture and tokenizer with freshly initialised weights (seeded,
        the global RNG untouched); with ``keep_embeddings`` the token/position embeddings, every
        norm and the unembedding are copied from this model."""

    # -- running ---------------------------------------------------------------------------------
    @abstractmethod
    def run(self, tokens: Int[torch.Tensor, "batch pos"], *,
            params: Optional[dict[str, torch.Tensor]] = None,
            stop_at_layer: Optional[int] = None, kv_cache: Any = None
            ) -> Float[torch.Tensor, "batch pos d_vocab"] | Float[torch.Tensor, "batch pos d_model"]:
        """Forward ``tokens`` [batch, pos] (no padding); logits [batch, pos, d_vocab], or the residual
        stream [batch, pos, d_model] entering block ``stop_at_layer``. ``kv_cache`` (from
        :meth:`prefix_cache` / :meth:`expand_cache`) holds earlier positions; ``params`` replaces
        named parameters for this call only."""

    @abstractmethod
    def prefix_cache(self, tokens: Sequence[int], params: Optional[dict[str, torch.Tensor]] = None) -> Any:
        """Run ``tokens`` [P] once and return a key-value cache of batch 1 that later runs reuse
        (and do not extend)."""

    @abstractmethod
    def expand_cache(self, cache: Any, batch: int) -> Any:
        """A cache from :meth:`prefix_cache` for a batch of ``batch`` continuations (no copy where
        the backend allows)."""

    def generate(self, tokens: Int[torch.Tensor, "batch pos"], max_new_tokens: int, **kwargs: Any
                 ) -> Int[torch.Tensor, "batch pos_plus_new_tokens"]:
        """Greedy (unless told otherwise) continuation with the model's KV cache; tokens out."""
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("verbose", False)
        return self.model.generate(tokens, max_new_tokens=max_new_tokens, **kwargs)

    # -- text ------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    @property
    def default_prepend_bos(self) -> bool:
        return bool(getattr(self.cfg, "default_prepend_bos", False))

    @property
    def bos_token_id(self) -> Optional[int]:
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        return int(bos) if bos is not None else None

    def to_tokens(self, text: str, prepend_bos: Optional[bool] = None) -> Int[torch.Tensor, "1 pos"]:
        """[1, pos] token ids of ``text`` on the model's device."""
        if self.tokenizer is None:
            raise UnsupportedModelError("model: has no tokenizer; pass token ids instead of text")
        return self.model.to_tokens(text, prepend_bos=self.default_prepend_bos if prepend_bos is None
                                    else prepend_bos)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.model).__name__}, n_layers={self.n_layers})"


BackendFactory = Callable[[Any], Backend]
