"""Model-aware helpers shared by the trace, the index and the interventions: the weights the
debugger reads (cached per model, invalidated when any parameter changes), the final norm's kind,
token and unit parsing with errors that say how a string tokenises.

Models are reached only through ``tl_plugins.backends.detect`` and ``tl_plugins.weights``."""

from __future__ import annotations

import numbers
import re
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

import tl_plugins
from tl_embedspace.debugger.core import FrozenNorm, norm_scale
from tl_plugins import backends as _backends
from tl_plugins.checks import check_index
from tl_plugins.errors import UnsupportedModelError

_CACHE: "weakref.WeakKeyDictionary[Any, tuple[tuple, DebugWeights]]" = weakref.WeakKeyDictionary()


def version_key(model: Any) -> tuple:
    """Changes whenever a parameter is replaced or modified in place (torch's version counters)."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def check_mlp_supported(backend: Any) -> None:
    """Refuse MLPs whose sub-updates are not ``hook_post @ W_out`` (SoLU with its norm, experts)."""
    cfg = backend.cfg
    if backend.attn_only or backend.d_mlp is None:
        raise UnsupportedModelError("model: attention-only (cfg.attn_only=True); it has no feed-forward "
                                    "sub-updates to trace or steer")
    if str(getattr(cfg, "act_fn", "") or "").endswith("_ln"):
        raise UnsupportedModelError(
            f"model: act_fn={cfg.act_fn!r} (SoLU with its LayerNorm): the MLP normalises its activations "
            "after the activation seam, so a coefficient is not an activation the seam can take; accepted: "
            "MLPs and gated MLPs without an activation norm")
    if getattr(cfg, "num_experts", None):
        raise UnsupportedModelError(
            f"model: a mixture of experts (num_experts={cfg.num_experts}): its units are per-expert and "
            "routed, not one W_out; accepted: dense MLPs and gated MLPs")


@dataclass
class DebugWeights:
    """What the debugger reads of a model, detached: W_out [L, d_mlp, d], W_O [L, H, d_head, d],
    W_U [d, V], W_E [V, d], the final norm's kind, weight and eps, value norms [L, d_mlp].

    On a model with norms after attention and MLP (Gemma 2/3: ``ln1_post``, ``ln2_post``), a
    sub-update reaches the residual as ``w2 * (m_i v_i) / sigma2`` with ``sigma2`` the post-MLP
    norm's scale at that position. ``W_out`` here is then the value as written, ``w2 * W_out``
    (what the index ranks and the trace reads), ``W_out_raw`` the MLP's own matrix (to compute
    ``sigma2`` from the coefficients), and ``attn_post_w`` / ``mlp_post_w`` [L, d] the norms'
    weights; all three are None on a pre-norm-only model."""

    backend: Any
    W_out: torch.Tensor
    W_O: torch.Tensor
    W_U: torch.Tensor
    W_E: torch.Tensor
    norm_kind: str
    norm_w: Optional[torch.Tensor]
    eps: float
    value_norms: torch.Tensor
    processing: str
    b_O: Optional[torch.Tensor] = None         # [L, d]
    b_out: Optional[torch.Tensor] = None       # [L, d]
    W_out_raw: Optional[torch.Tensor] = None   # [L, d_mlp, d], only with post norms
    attn_post_w: Optional[torch.Tensor] = None  # [L, d]
    mlp_post_w: Optional[torch.Tensor] = None   # [L, d]
    post_eps: float = 0.0

    def post_scale(self, x: torch.Tensor) -> float:
        """The RMS scale ``sqrt(mean(x^2) + eps)`` a post norm divides ``x`` [d] by."""
        return float((x.double().pow(2).mean() + self.post_eps).sqrt())

    @property
    def n_layers(self) -> int:
        return self.W_out.shape[0]

    @property
    def d_mlp(self) -> int:
        return self.W_out.shape[1]

    @property
    def d_vocab(self) -> int:
        return self.W_U.shape[1]

    def frozen_norm(self, x_final: torch.Tensor) -> FrozenNorm:
        return FrozenNorm(self.norm_kind, float(norm_scale(x_final.float(), self.norm_kind, self.eps)),
                          self.norm_w)

    def readout_basis(self) -> torch.Tensor:
        """[d, V]: a written vector ``v``'s token scores ``P(v) * w @ W_U`` (the final norm's
        weight and centring, its scale left out: token rankings do not depend on it)."""
        B = self.W_U if self.norm_w is None else self.norm_w[:, None] * self.W_U
        if self.norm_kind == "ln":
            B = B - B.mean(0, keepdim=True)
        return B


def final_norm_kind(backend: Any) -> str:
    cfg = backend.cfg
    nt = str(getattr(cfg, "normalization_type", None) or "")
    if getattr(cfg, "final_rms", False) or nt.startswith("RMS"):
        return "rms"
    if nt.startswith("LN"):
        return "ln"
    return "none"


def debug_weights(model: Any) -> DebugWeights:
    """The model's :class:`DebugWeights`, cached until a parameter changes."""
    key = version_key(model)
    hit = _CACHE.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    backend = _backends.detect(model)
    check_mlp_supported(backend)
    W = tl_plugins.weights(model)
    with torch.no_grad():
        W_out = W.W_out.float()
        W_O = W.W_O.float()
        W_U = W.W_U.float()
        W_E = W.W_E.float()
        ln_w = W.ln_final_w()
        kind = final_norm_kind(backend)
        eps = float(getattr(backend.cfg, "eps", 1e-5))
        post = post_norm_weights(backend, eps)
        W_out_raw = None
        if post is not None:
            W_out_raw, W_out = W_out, W_out * post[1][:, None, :]
        b_O = getattr(W, "b_O", None)
        b_out = getattr(W, "b_out", None)
        dw = DebugWeights(backend=backend, W_out=W_out, W_O=W_O, W_U=W_U, W_E=W_E, norm_kind=kind,
                          norm_w=None if ln_w is None or kind == "none" else ln_w.float(),
                          eps=eps, value_norms=W_out.norm(dim=-1), processing=W.processing.describe(),
                          b_O=None if b_O is None else b_O.detach().float(),
                          b_out=None if b_out is None else b_out.detach().float(), W_out_raw=W_out_raw,
                          attn_post_w=None if post is None else post[0],
                          mlp_post_w=None if post is None else post[1], post_eps=eps)
    _check_norm(dw, backend)
    _CACHE[model] = (key, dw)
    return dw


def post_norm_weights(backend: Any, eps: float) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """``(attn_post_w, mlp_post_w)`` [L, d] of a model with RMS norms after attention and MLP, read
    by probing each norm (so Gemma's stored ``w - 1`` and TransformerLens's folded ``w`` read alike),
    or None when the blocks have no such norms. A post norm that is not an RMS norm with a weight
    (checked on random vectors) is refused."""
    L = backend.n_layers
    mods = [(backend.output_norm("attn", l), backend.output_norm("mlp", l)) for l in range(L)]
    if all(a is None and m is None for a, m in mods):
        return None
    if any(a is None or m is None for a, m in mods):
        raise UnsupportedModelError("model: some blocks have a norm after attention or MLP and others do "
                                    "not; accepted: models whose blocks all have both or neither")
    from tl_plugins.backends.base import rms_norm_multiplier

    d = backend.cfg.d_model
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, d, generator=g) * 2
    out = []
    with torch.no_grad():
        for pair in mods:
            ws = []
            for norm in pair:
                w = rms_norm_multiplier(norm, d, eps=eps, dtype=backend.dtype, device=backend.device)
                real = norm(x.to(backend.device, backend.dtype)).float().cpu()
                ours = w * x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
                if float((real - ours).abs().max()) > 1e-3 * max(1.0, float(real.abs().max())):
                    raise UnsupportedModelError(
                        "model: a norm after attention or MLP is not an RMS norm with a weight; accepted: "
                        "models without post norms, or with RMS post norms (Gemma 2/3)")
                ws.append(w)
            out.append(ws)
    return torch.stack([a for a, _ in out]), torch.stack([m for _, m in out])


def _check_norm(dw: DebugWeights, backend: Any) -> None:
    """The frozen-scale norm must reproduce the backend's final norm (up to its bias)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, dw.W_U.shape[0], generator=g, dtype=torch.float32) * 3
    with torch.no_grad():
        real = backend.final_norm(x.to(backend.device, backend.dtype)).float().cpu()
    ours = torch.stack([dw.frozen_norm(x[i]).apply(x[i]) for i in range(2)])
    diff = (real - ours)
    diff = diff[0] - diff[1]  # a bias cancels
    if float(diff.abs().max()) > 1e-3 * max(1.0, float(real.abs().max())):
        raise UnsupportedModelError(
            f"model: its final norm is not one the debugger reproduces (normalization_type="
            f"{getattr(backend.cfg, 'normalization_type', None)!r}); accepted: RMSNorm, LayerNorm, none")


# -- tokens -----------------------------------------------------------------------------------
def token_str(backend: Any, i: int) -> str:
    tok = backend.tokenizer
    return tok.decode([int(i)]) if tok is not None else f"<{int(i)}>"


def token_strs(backend: Any, ids: Sequence[int]) -> list[str]:
    tok = backend.tokenizer
    if tok is None:
        return [f"<{int(i)}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def resolve_token(backend: Any, value: Union[str, int, None], arg: str) -> Optional[int]:
    """A single token id for ``value`` (a string that is exactly one token, or an id), or an error
    saying how the string tokenises."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"{arg}: got {value!r}; accepted: a token string or id")
    if isinstance(value, numbers.Integral) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        i = int(value)
        if not 0 <= i < backend.d_vocab:
            raise IndexError(f"{arg}: got token id {i}; accepted: an id in [0, {backend.d_vocab - 1}]")
        return i
    if not isinstance(value, str) or value == "":
        raise ValueError(f"{arg}: got {value!r}; accepted: a non-empty token string or a token id")
    tok = backend.tokenizer
    if tok is None:
        raise ValueError(f"{arg}: the model has no tokenizer; pass a token id")
    ids = tok.encode(value, add_special_tokens=False)
    if len(ids) != 1:
        pieces = ", ".join(repr(tok.decode([i])) for i in ids) or "nothing"
        unk = getattr(tok, "unk_token_id", None)
        hint = " (unknown to the tokenizer)" if unk is not None and unk in ids else ""
        raise ValueError(f"{arg}: {value!r} is not a single token{hint}: it tokenises into {len(ids)} "
                         f"tokens [{pieces}] (ids {ids}); accepted: a string that is exactly one token "
                         "(mind the leading space), or a token id")
    if getattr(tok, "unk_token_id", None) is not None and ids[0] == tok.unk_token_id \
            and value != getattr(tok, "unk_token", None):
        raise ValueError(f"{arg}: {value!r} is unknown to the tokenizer (it maps to {tok.unk_token!r}, "
                         f"id {ids[0]}); accepted: a string that is exactly one token")
    return int(ids[0])


def resolve_tokens(backend: Any, values: Union[str, int, Sequence], arg: str) -> list[int]:
    """A list of token ids from one or several token strings/ids."""
    if isinstance(values, (str, numbers.Integral)):
        values = [values]
    out = [resolve_token(backend, v, f"{arg}[{i}]") for i, v in enumerate(values)]
    if not out:
        raise ValueError(f"{arg}: got no tokens; accepted: one or more token strings or ids")
    return out


def to_token_rows(backend: Any, prompt: Any) -> list[torch.Tensor]:
    """One 1-d token tensor per prompt, from a string, a list of strings, ids or a [batch, pos] tensor."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt, torch.Tensor):
        t = prompt.long().cpu()
        if t.ndim == 1:
            t = t[None]
        if t.ndim != 2 or t.shape[1] == 0:
            raise ValueError(f"prompt_or_tokens: got a tensor of shape {tuple(prompt.shape)}; accepted: "
                             "[pos] or [batch, pos] token ids")
        rows = list(t)
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, numbers.Integral) for p in prompt):
        rows = [torch.tensor(list(prompt), dtype=torch.long)]
    elif isinstance(prompt, (list, tuple)) and prompt:
        rows = []
        for i, p in enumerate(prompt):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt_or_tokens[{i}]: an empty prompt; accepted: text with a token")
                rows.append(backend.to_tokens(p)[0].cpu())
            else:
                rows.extend(to_token_rows(backend, p))
    else:
        raise ValueError(f"prompt_or_tokens: got {prompt!r}; accepted: a string, a list of strings, "
                         "token ids or a [batch, pos] tensor")
    for r in rows:
        if r.numel() == 0:
            raise ValueError("prompt_or_tokens: a prompt tokenises to no tokens")
        bad = (r < 0) | (r >= backend.d_vocab)
        if bad.any():
            raise IndexError(f"prompt_or_tokens: token id {int(r[bad][0])} out of range [0, {backend.d_vocab - 1}]")
    return rows


# -- units ------------------------------------------------------------------------------------
_UNIT_RE = re.compile(r"^\s*L(\d+)\s*[UD](\d+)\s*$", re.I)
_HEAD_RE = re.compile(r"^\s*L(\d+)\s*H(\d+)\s*$", re.I)


def parse_unit(label: str) -> tuple[int, int]:
    """"L12U345" (or the original tool's "L12D345") -> (12, 345)."""
    m = _UNIT_RE.match(str(label))
    if not m:
        raise ValueError(f"unit: got {label!r}; accepted: 'L<layer>U<unit>' such as 'L12U345' "
                         "(or 'L12D345')")
    return int(m.group(1)), int(m.group(2))


def unit_label(layer: int, unit: int) -> str:
    return f"L{int(layer)}U{int(unit)}"


def check_unit(backend: Any, layer: Any, unit: Any, arg: str = "unit") -> tuple[int, int]:
    layer = backend.check_layer(layer, "layer")
    return layer, check_index(unit, backend.d_mlp, arg, where=f" in layer {layer}")
