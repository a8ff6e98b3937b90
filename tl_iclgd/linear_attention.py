"""The exact oracle of von Oswald et al. 2023: one linear self-attention layer = one GD step on least squares.

Tokens e_j = [x_j; y_j] (j = 1..N) and a query e_q = [x_q; 0]. With

    W_K = W_Q = [[I, 0], [0, 0]]      (read the x part)
    W_V       = [[0, 0], [W0, -I]]    (write W0 x_j - y_j into the y part)
    P         = -lr * I

the layer e_q + P (1/N) sum_j (W_V e_j) (W_K e_j)^T (W_Q e_q) has y part
-lr/N sum_j (W0 x_j - y_j) x_j^T x_q = (W1 - W0) x_q, where W1 = W0 - lr * grad of
L(W) = 1/(2N) sum_j |W x_j - y_j|^2 at W0. So W0 x_q plus the layer's y part is exactly the
prediction of the model after one GD step. Pure tensors; used by the tests as an exact identity.
"""

from __future__ import annotations

import torch
from jaxtyping import Float


def linear_self_attention(E: Float[torch.Tensor, "n d"], q: Float[torch.Tensor, " d"], W_K: Float[torch.Tensor, "d d"],
                          W_Q: Float[torch.Tensor, "d d"], W_V: Float[torch.Tensor, "d d"], P: Float[torch.Tensor, "d d"]
                          ) -> Float[torch.Tensor, " d"]:
    """One linear (no softmax) self-attention update of the query token.

    E: [N, d] context tokens, q: [d] query token, W_*: [d, d], P: [d, d] -> [d]:
    q + P @ (1/N) sum_j (W_V e_j) <W_K e_j, W_Q q>.
    """
    N = E.shape[0]
    keys = E @ W_K.T          # [N, d]
    values = E @ W_V.T        # [N, d]
    scores = keys @ (W_Q @ q)  # [N]
    return q + P @ (values.T @ scores) / N


def gd_weights(d_x: int, d_y: int, lr: float, W0: Float[torch.Tensor, "d_y d_x"], dtype: torch.dtype = torch.float64
               ) -> tuple[Float[torch.Tensor, "d d"], Float[torch.Tensor, "d d"], Float[torch.Tensor, "d d"],
                          Float[torch.Tensor, "d d"]]:
    """(W_K, W_Q, W_V, P) of the construction in the module doc; W0: [d_y, d_x] the starting weights."""
    d = d_x + d_y
    W_K = torch.zeros(d, d, dtype=dtype)
    W_K[:d_x, :d_x] = torch.eye(d_x, dtype=dtype)
    W_Q = W_K.clone()
    W_V = torch.zeros(d, d, dtype=dtype)
    W_V[d_x:, :d_x] = W0.to(dtype)
    W_V[d_x:, d_x:] = -torch.eye(d_y, dtype=dtype)
    P = -lr * torch.eye(d, dtype=dtype)
    return W_K, W_Q, W_V, P


__all__ = ["linear_self_attention", "gd_weights"]
