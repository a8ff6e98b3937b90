"""von Oswald et al. 2023: a linear self-attention layer with constructed weights is one GD step."""

import torch

from tl_iclgd.linear_attention import gd_weights, linear_self_attention


def test_linear_attention_equals_one_gd_step_on_least_squares():
    g = torch.Generator().manual_seed(0)
    d_x, d_y, N, lr = 5, 3, 12, 0.07
    X = torch.randn(N, d_x, generator=g, dtype=torch.float64)
    Y = torch.randn(N, d_y, generator=g, dtype=torch.float64)
    x_q = torch.randn(d_x, generator=g, dtype=torch.float64)
    W0 = torch.randn(d_y, d_x, generator=g, dtype=torch.float64)

    # the oracle: autograd on L(W) = 1/(2N) sum |W x_j - y_j|^2, one SGD step
    W = W0.clone().requires_grad_(True)
    loss = ((X @ W.T - Y) ** 2).sum() / (2 * N)
    (grad,) = torch.autograd.grad(loss, W)
    W1 = W0 - lr * grad

    E = torch.cat([X, Y], dim=1)
    q = torch.cat([x_q, torch.zeros(d_y, dtype=torch.float64)])
    out = linear_self_attention(E, q, *gd_weights(d_x, d_y, lr, W0))
    assert torch.equal(out[:d_x], x_q)  # the x part passes through
    torch.testing.assert_close(W0 @ x_q + out[d_x:], W1 @ x_q, rtol=0, atol=1e-13)
    # and it is not trivially true: a different lr gives a different prediction
    out2 = linear_self_attention(E, q, *gd_weights(d_x, d_y, 2 * lr, W0))
    assert (out2[d_x:] - out[d_x:]).abs().max() > 1e-3
