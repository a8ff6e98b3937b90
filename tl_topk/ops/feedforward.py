"""Top-k feed-forward: keep each token's k largest pre-activations, zero the rest.

Reading an MLP as a key-value memory (Geva et al.; Gupta et al. 2021 section 3): token = query,
columns of W_in (or W_gate) = keys, rows of W_out = values. Zeroing a pre-activation zeroes its
unit exactly when the activation has f(0) = 0, so ``act(pre)`` masked to the kept units equals
``act(pre with the rest set to 0)``. Ties go to the smaller unit index, as in attention.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Float

from tl_topk.ops.selection import topk_keep_mask

# TransformerLens act_fn names with f(0) = 0 and an elementwise definition.
EXACT_ACTIVATIONS = frozenset({
    "relu", "gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "silu", "swish", "quick_gelu",
    "relu2", "relu_squared", "tanh",
})
# Refused, with the reason shown to the user.
REFUSED_ACTIVATIONS = {
    "solu": "SoLU (x * softmax(x)) mixes units, so zeroing pre-activations is not top-k of the outputs",
    "solu_ln": "SoLU (x * softmax(x)) mixes units, so zeroing pre-activations is not top-k of the outputs",
}


def check_activation(name: str) -> None:
    """Raise ``ValueError`` for activations top-k feed-forward cannot reproduce exactly."""
    if name in REFUSED_ACTIVATIONS:
        raise ValueError(f"ff_k: model act_fn {name!r} is refused: {REFUSED_ACTIVATIONS[name]}")
    if name not in EXACT_ACTIVATIONS:
        raise ValueError(
            f"ff_k: model act_fn {name!r} is not known to satisfy f(0) = 0; accepted: "
            f"{', '.join(sorted(EXACT_ACTIVATIONS))}"
        )


def topk_units_mask(pre: torch.Tensor, k_units: int) -> torch.Tensor:
    """Bool [..., d_mlp]: the ``k_units`` largest entries of each row (ties to the smaller index)."""
    rows = torch.full(pre.shape[:-1], min(k_units, pre.shape[-1]), dtype=torch.long, device=pre.device)
    return topk_keep_mask(pre.detach(), rows)


FF_RULES = ("value", "magnitude")


def topk_activation(
    pre: Float[torch.Tensor, "batch pos d_mlp"],
    k_units: int,
    act_fn: Callable[[torch.Tensor], torch.Tensor],
    rule: str = "value",
) -> Float[torch.Tensor, "batch pos d_mlp"]:
    """``act_fn(pre)`` with all but each row's ``k_units`` selected units zeroed.

    pre: [batch, pos, d_mlp] (for gated MLPs the gate pre-activation). Returns the same shape.
    ``rule="value"`` (the paper's) keeps the largest pre-activations; ``"magnitude"`` keeps the
    largest ``|act_fn(pre)|`` (units whose output is farthest from zero, which matters for SiLU/GELU,
    where negative pre-activations give non-zero outputs). With ``k_units >= d_mlp`` this is
    ``act_fn(pre)`` itself.
    """
    if rule not in FF_RULES:
        raise ValueError(f"rule: got {rule!r}; accepted: {', '.join(FF_RULES)}")
    out = act_fn(pre)
    if k_units >= pre.shape[-1]:
        return out
    keep = topk_units_mask(pre if rule == "value" else out.abs(), k_units)
    return torch.where(keep, out, torch.zeros_like(out))
