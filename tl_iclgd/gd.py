"""Fine-tuning on the demonstrations: vanilla GD and layer-causal GD (LCGD), without touching the model.

As in Dai et al. 2023 and Deutch et al. 2024: plain SGD (no momentum, constant learning rate), batch
size 1, one epoch over the demonstrations in the ICL order, only the chosen parameters (the K and V
projections, weights and biases, of every layer by default); loss = next-token cross-entropy over
every token of the formatted demonstration, or over the label tokens only.

LCGD (Deutch et al.): the residual stream entering every block is detached (stop-gradient); every
block's output ("resid_post") or its attention sub-layer's output ("resid_mid") is read out through
the frozen final norm and unembedding (logit lens); the per-layer losses are summed and one SGD step
updates every layer. So layer l's update depends only on layers <= l, as in ICL.

The trainable tensors are copies evaluated through the backend's ``functional_call``; the user's model
is never modified, even if an error is raised half-way. The model is reached only through its
backend (``tl_plugins.backends.detect``): parameters by (layer, projection), hook names, the readout.

SGD on processed weights (fold_ln, centering) is a different experiment (same function, different
parameterisation), so :func:`finetune` refuses them unless ``GDConfig(allow_processed=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float

from tl_iclgd.capture import backend_of
from tl_iclgd.tasks import TokenizedTask

LOSSES = ("all_tokens", "label_only")
ORDERS = ("icl", "reverse")
READOUTS = ("resid_post", "resid_mid")
_PARAM_LETTERS = "qkvo"


#: The learning rate of the command line, the benchmark and the report (GDConfig's own default).
DEFAULT_LR = 0.1


@dataclass(frozen=True)
class GDConfig:
    """How to fine-tune on the demonstrations (see the module doc).

    lr: SGD learning rate (> 0); the default 0.1 is the smallest of {0.03, 0.1, 0.3} at which one epoch
    clearly lowers the demonstrations' loss on SmolLM2-135M antonyms (9.3 -> 5.7 nats). params: letters from "qkvo" choosing attention projections of every
    layer (weights and biases; "kv" is the papers' choice) or a tuple of exact parameter names.
    layers: restrict ``params`` letters to these layers (None = all). order: "icl" (the ICL prompt's
    order) or "reverse". loss: "all_tokens" or "label_only". epochs: passes over the demonstrations.
    layer_causal: LCGD instead of vanilla GD. readout: where LCGD reads each layer out.
    allow_processed: run on folded/centred weights anyway.
    """

    lr: float = DEFAULT_LR
    params: Union[str, tuple[str, ...]] = "kv"
    layers: Optional[tuple[int, ...]] = None
    order: str = "icl"
    loss: str = "all_tokens"
    epochs: int = 1
    layer_causal: bool = False
    readout: str = "resid_post"
    allow_processed: bool = False

    def __post_init__(self):
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"lr: got {lr!r}; accepted: a finite number > 0")
        p = self.params
        if isinstance(p, str):
            if p == "" or any(c not in _PARAM_LETTERS for c in p) or len(set(p)) != len(p):
                raise ValueError(f"params: got {p!r}; accepted: distinct letters from 'qkvo' (e.g. 'kv', 'qkv') "
                                 "or a tuple of parameter names")
        elif isinstance(p, (tuple, list)):
            if len(p) == 0 or not all(isinstance(s, str) and s for s in p):
                raise ValueError(f"params: got {p!r}; accepted: a non-empty tuple of parameter names")
            object.__setattr__(self, "params", tuple(p))
        else:
            raise ValueError(f"params: got {p!r}; accepted: a string of 'qkvo' letters or a tuple of names")
        if self.layers is not None:
            if not isinstance(self.layers, (tuple, list)) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in self.layers) or len(self.layers) == 0:
                raise ValueError(f"layers: got {self.layers!r}; accepted: None or a non-empty tuple of ints")
            object.__setattr__(self, "layers", tuple(self.layers))
        if self.order not in ORDERS:
            raise ValueError(f"order: got {self.order!r}; accepted: {', '.join(ORDERS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss: got {self.loss!r}; accepted: {', '.join(LOSSES)}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs: got {self.epochs!r}; accepted: an int >= 1")
        if not isinstance(self.layer_causal, bool):
            raise ValueError(f"layer_causal: got {self.layer_causal!r}; accepted: True or False")
        if self.readout not in READOUTS:
            raise ValueError(f"readout: got {self.readout!r}; accepted: {', '.join(READOUTS)}")

    @property
    def method(self) -> str:
        return "lcgd" if self.layer_causal else "gd"


def select_params(model: Any, params: Union[str, Sequence[str]] = "kv",
                  layers: Optional[Sequence[int]] = None) -> dict[str, torch.nn.Parameter]:
    """Name -> parameter of the chosen selector (see :class:`GDConfig`), in layer order.

    Letters ask the backend for each layer's projection (``attention_parameters(layer, letter)``):
    on a HookedTransformer with grouped-query attention K/V live at the kv-head count as
    ``_W_K``/``_W_V``/``_b_K``/``_b_V``; on a TransformerBridge they are the wrapped Hugging Face
    projections (GPT-2's q/k/v are separate tensors split off the fused ``c_attn`` at boot, and the
    forward uses those). Names are the model's ``named_parameters`` names.
    """
    return _select(backend_of(model), params, layers)[0]


def _select(be: Any, params: Union[str, Sequence[str]], layers: Optional[Sequence[int]]
            ) -> tuple[dict[str, torch.nn.Parameter], dict[str, Optional[int]]]:
    """:func:`select_params` plus the layer of every selected name."""
    L = be.n_layers
    if isinstance(params, str):
        if layers is None:
            layers = range(L)
        for x in layers:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < L:
                raise ValueError(f"layers: got {list(layers)!r}; accepted: ints in [0, {L - 1}]")
        out: dict[str, torch.nn.Parameter] = {}
        where: dict[str, Optional[int]] = {}
        for layer in layers:
            for c in params:
                got = be.attention_parameters(layer, c)
                if not got:
                    raise ValueError(f"params: {c!r} selects no weight in layer {layer} of this model")
                out.update(got)
                where.update({n: layer for n in got})
        return out, where
    named = be.named_parameters()
    unknown = [n for n in params if n not in named]
    if unknown:
        sample = [n for c in "kv" for n in be.attention_parameters(0, c)][:4]
        raise ValueError(f"params: unknown parameter names {unknown}; accepted: names from "
                         f"model.named_parameters(), e.g. {sample}")
    if layers is not None:
        raise ValueError("layers: only applies to letter selectors like 'kv'; got explicit parameter names")
    return {n: named[n] for n in params}, {n: be.layer_of(n) for n in params}


def check_unprocessed(model: Any, allow_processed: bool = False) -> None:
    """Raise if the model's weights were folded or centred (unless ``allow_processed``)."""
    import tl_plugins

    proc = tl_plugins.weights(model).processing
    if proc.is_processed and not allow_processed:
        raise ValueError(
            f"model: weights are processed ({proc.describe()}). Folding layer norms and centering keep the "
            "function but change the parameterisation, so SGD on them is a different experiment from the "
            "papers'. Load the model unprocessed (e.g. tl_plugins.models.load('smollm2-135m')) or pass "
            "GDConfig(allow_processed=True).")


@dataclass
class Trace:
    """Per-step record of fine-tuning.

    demo: [steps] index of the demonstration used. loss: [steps] the loss that was differentiated (for
    LCGD the sum over layers). layer_loss: [steps, L] per-layer logit-lens losses (LCGD) or None.
    grad_norm: [steps, L] L2 norm of the gradient of each layer's trained parameters.
    """

    demo: list[int]
    loss: torch.Tensor
    grad_norm: torch.Tensor
    layer_loss: Optional[torch.Tensor] = None

    def to_frame(self):
        import pandas as pd

        rows = []
        for s, j in enumerate(self.demo):
            row = {"step": s, "demo": j, "loss": float(self.loss[s])}
            for layer in range(self.grad_norm.shape[1]):
                row[f"grad_norm_L{layer}"] = float(self.grad_norm[s, layer])
            rows.append(row)
        return pd.DataFrame(rows)

    def _repr_html_(self) -> str:
        return "<b>Trace</b>" + self.to_frame().to_html(index=False)


@dataclass
class FinetuneResult:
    """Trained tensors, their change, and the trace.

    params: name -> trained tensor (same shapes as the model's). deltas: name -> trained - original.
    attn_inputs: per step, the attention inputs [T, L, d_model] of the trained sequence (for the FT
    side of Kendall tau), or None. layers: name -> layer (None outside the blocks).
    """

    params: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    trace: Trace
    config: GDConfig
    n_demos: int
    attn_inputs: Optional[list[torch.Tensor]] = None
    layers: dict[str, Optional[int]] = field(default_factory=dict)  # name -> layer (the backend's layer_of)

    def delta_norms(self, n_layers: int) -> Float[torch.Tensor, " n_layers"]:
        """[n_layers] L2 norm of each layer's total update."""
        out = torch.zeros(n_layers, dtype=torch.float64)
        for name, d in self.deltas.items():
            layer = self.layers.get(name)
            if layer is not None:
                out[layer] += d.double().pow(2).sum()
        return out.sqrt()

    def to_frame(self):
        return self.trace.to_frame()

    def _repr_html_(self) -> str:
        return f"<b>FinetuneResult</b> ({self.config.method}, {self.n_demos} demos)" + self.to_frame().to_html()


def _sequences(demos: Any, loss: str) -> list[tuple[list[int], Optional[list[bool]]]]:
    if isinstance(demos, TokenizedTask):
        return [(list(demos.demo_sequence(j)), list(demos.demo_label_mask(j))) for j in range(len(demos.demos))]
    if isinstance(demos, (list, tuple)):
        if len(demos) == 0:
            raise ValueError("demos: got an empty list; accepted: at least one demonstration")
        if loss == "label_only":
            raise ValueError("loss: 'label_only' needs a TokenizedTask (label positions); got plain token lists")
        out = []
        for i, s in enumerate(demos):
            if not isinstance(s, (list, tuple)) or len(s) < 2:
                raise ValueError(f"demos[{i}]: got {s!r}; accepted: a sequence of at least 2 token ids")
            out.append(([int(t) for t in s], None))
        return out
    raise TypeError(f"demos: got {type(demos).__name__}; accepted: a TokenizedTask or a list of token-id lists")


def _ce(logits: torch.Tensor, toks: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy. logits [..., T, V], toks [T], mask [T-1] over targets or None."""
    pred = logits[..., :-1, :].float()
    target = toks[1:]
    lp = F.log_softmax(pred, dim=-1)
    nll = -lp.gather(-1, target.expand(*pred.shape[:-1]).unsqueeze(-1)).squeeze(-1)  # [..., T-1]
    if mask is None:
        return nll.mean(-1)
    return (nll * mask).sum(-1) / mask.sum()


def finetune(model: Any, demos: Any, config: GDConfig = GDConfig(), *, record_inputs: bool = False
             ) -> FinetuneResult:
    """Fine-tune copies of the chosen parameters on ``demos`` and return them (the model is untouched).

    demos: a :class:`TokenizedTask` (its demonstrations, in order; BOS as the task says) or a list of
    token-id sequences (all-token loss only). record_inputs: keep each step's attention inputs.
    """
    if not isinstance(config, GDConfig):
        raise TypeError(f"config: got {type(config).__name__}; accepted: a tl_iclgd.GDConfig")
    check_unprocessed(model, config.allow_processed)
    return run_finetune(model, demos, config, record_inputs=record_inputs)


def run_finetune(model: Any, demos: Any, config: GDConfig, *, record_inputs: bool) -> FinetuneResult:
    """:func:`finetune` once the caller has checked ``config`` and the model's weights (compare does so
    once per run, not per variant, seed and method)."""
    be = backend_of(model)
    seqs = _sequences(demos, config.loss)
    _check_sequences(seqs, be.n_ctx, config.loss)
    selected, where = _select(be, config.params, config.layers)
    L = be.n_layers
    P = {n: p.detach().clone().requires_grad_(True) for n, p in selected.items()}
    layer_idx = [where[n] for n in P]
    order = list(range(len(seqs)))
    if config.order == "reverse":
        order = order[::-1]
    order = order * config.epochs
    hooks = _FinetuneHooks(be, config.readout, record_inputs)

    losses, gnorms, layer_losses, inputs = [], [], [], []
    for j in order:
        s, m = seqs[j]
        toks = torch.tensor([s], dtype=torch.long, device=be.device)
        mask = None
        if config.loss == "label_only":
            mask = torch.tensor(m[1:], dtype=torch.float32, device=be.device)  # type: ignore[index]
        store: dict[str, torch.Tensor] = {}
        with torch.enable_grad():
            loss, per_layer = _step_loss(be, hooks, P, toks, mask, store, config.layer_causal)
            grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True)
        new, gn = _sgd_step(P, grads, layer_idx, L, config.lr)
        if not (math.isfinite(float(loss.detach())) and all(bool(torch.isfinite(t).all()) for t in new.values())):
            raise FloatingPointError(
                f"lr: fine-tuning diverged at step {len(losses) + 1} of {len(order)} (loss {float(loss):.4g}, "
                f"parameters no longer finite) with lr={config.lr}; accepted: a smaller learning rate")
        P = new
        losses.append(float(loss.detach()))
        gnorms.append(gn)
        if per_layer is not None:
            layer_losses.append(per_layer.detach().double().cpu())
        if hooks.attn_in is not None:
            inputs.append(torch.stack([hooks.attn_in[layer][1](store[f"in{layer}"])[0] for layer in range(L)],
                                      dim=1).detach().float().cpu())  # [T, L, d]
    final = {n: p.detach() for n, p in P.items()}
    deltas = {n: final[n] - selected[n].detach() for n in final}
    trace = Trace(order, torch.tensor(losses, dtype=torch.float64), torch.stack(gnorms),
                  torch.stack(layer_losses) if layer_losses else None)
    return FinetuneResult(final, deltas, trace, config, len(seqs), inputs if record_inputs else None,
                          dict(where))


def _check_sequences(seqs: list, n_ctx: int, loss: str) -> None:
    for i, (s, _) in enumerate(seqs):
        if len(s) > n_ctx:
            raise ValueError(f"demos[{i}]: {len(s)} tokens, longer than the model's context n_ctx={n_ctx}")
    if loss == "label_only":
        for i, (s, m) in enumerate(seqs):
            if not any(m[1:]):  # type: ignore[index]
                raise ValueError(f"demos[{i}]: no label token after the first position; label_only has nothing "
                                 "to predict")


class _FinetuneHooks:
    """Hook names and functions of one fine-tuning run, asked of the backend once."""

    def __init__(self, be: Any, readout: str, record_inputs: bool):
        L = be.n_layers
        if readout == "resid_mid" and be.attn_only:
            readout = "resid_post"  # attention-only blocks have no mid point: the block output is it
        self.n_layers = L
        self.attn_in = [be.attention_input_hook(layer) for layer in range(L)] if record_inputs else None
        self.resid_pre = [be.hook_name("resid_pre", layer) for layer in range(L)]
        self.readout_at = [be.hook_name(readout, layer) for layer in range(L)]

    def keep_inputs(self, store: dict) -> list:
        """Hooks keeping each layer's attention input in ``store`` (none unless inputs are recorded)."""
        if self.attn_in is None:
            return []

        def keep_in(layer):  # keyed by layer: the bridge renames aliased hook points
            def fn(x, hook):
                store[f"in{layer}"] = x.detach()
            return fn
        return [(self.attn_in[layer][0], keep_in(layer)) for layer in range(self.n_layers)]

    def layer_causal(self, store: dict) -> list:
        """Hooks that cut the gradient at every block's input and keep every layer's readout point."""
        def cut(x, hook):
            return x.detach()

        def keep_readout(layer):
            def fn(x, hook):
                store[f"readout{layer}"] = x
            return fn
        L = self.n_layers
        return ([(self.resid_pre[layer], cut) for layer in range(L)]
                + [(self.readout_at[layer], keep_readout(layer)) for layer in range(L)])


def _step_loss(be: Any, hooks: _FinetuneHooks, P: dict, toks: torch.Tensor, mask: Optional[torch.Tensor],
               store: dict, layer_causal: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(loss, per-layer losses or None) of one sequence: the model's loss, or for layer-causal GD the
    sum over layers of each layer's logit-lens loss with the gradient cut at every block's input."""
    fwd = hooks.keep_inputs(store)
    if not layer_causal:
        with be.hooks(fwd):
            logits = be.run(toks, params=P)
        return _ce(logits[0], toks[0], mask), None
    L = hooks.n_layers
    with be.hooks(fwd + hooks.layer_causal(store)):
        be.run(toks, params=P, stop_at_layer=L)
    resid = torch.cat([store[f"readout{layer}"] for layer in range(L)], dim=0)  # [L, T, d]
    per_layer = _ce(be.readout(resid), toks[0], mask)  # [L] (logit lens)
    return per_layer.sum(), per_layer


def _sgd_step(P: dict, grads: Sequence[Optional[torch.Tensor]], layer_idx: list, L: int,
              lr: float) -> tuple[dict, torch.Tensor]:
    """(parameters after one SGD step, [L] gradient norm per layer); an unused parameter's gradient is 0."""
    sq = [torch.zeros((), dtype=torch.float32) for _ in range(L)]
    new = {}
    with torch.no_grad():
        for (name, p), g, layer in zip(P.items(), grads, layer_idx):
            if g is None:
                g = torch.zeros_like(p)
            if layer is not None:
                sq[layer] = sq[layer] + torch.linalg.vector_norm(g.float()) ** 2
            new[name] = (p.detach() - lr * g).requires_grad_(True)
    return new, torch.stack(sq).double().sqrt()


__all__ = ["GDConfig", "FinetuneResult", "Trace", "finetune", "select_params", "check_unprocessed",
           "LOSSES", "ORDERS", "READOUTS"]
