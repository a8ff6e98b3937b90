"""Pure metric functions against hand computations and analytic identities."""

import math

import pytest
import torch
from scipy.stats import kendalltau

from tl_iclgd import metrics as M
from tl_iclgd.baselines import random_updates_like


def _orthonormal(d, k, seed=0):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return [q[:, i] for i in range(k)]


@pytest.mark.parametrize("norm_h", [1.0, 0.01, 37.0])
def test_simaou_norm_artefact_is_quarter_for_orthogonal_updates(norm_h):
    # h, a, b mutually orthogonal with |a| = |b| = sqrt(3)|h|: the updates share no direction,
    # yet normalising each h first gives exactly 1/4 (Deutch et al.), while the raw metric gives 0.
    h, a, b = (v * s for v, s in zip(_orthonormal(16, 3), (norm_h, math.sqrt(3) * norm_h, math.sqrt(3) * norm_h)))
    raw = M.simaou(h + a, h, h + b)
    normed = M.simaou(h + a, h, h + b, normalise=True)
    assert abs(float(raw)) < 1e-12
    assert float(normed) == pytest.approx(0.25, abs=1e-12)


def test_simaou_batched_matches_loop_and_identical_updates_score_one():
    g = torch.Generator().manual_seed(1)
    hz, hi, hf = (torch.randn(5, 7, 32, generator=g) for _ in range(3))
    out = M.simaou(hi, hz, hf)
    assert out.shape == (5, 7)
    a, b = (hi[2, 3] - hz[2, 3]).double(), (hf[2, 3] - hz[2, 3]).double()
    assert float(out[2, 3]) == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
    assert torch.allclose(M.simaou(hi, hz, hi), torch.ones(5, 7, dtype=torch.float64))


def test_zero_updates_are_nan_and_counted():
    g = torch.Generator().manual_seed(2)
    hz = torch.randn(4, 8, generator=g)
    hi = torch.randn(4, 8, generator=g)
    hf = hi.clone()
    hf[1] = hz[1]  # FT did not move example 1
    hi2 = hi.clone()
    hi2[3] = hz[3]  # ICL did not move example 3
    s = M.simaou(hi2, hz, hf)
    assert torch.isnan(s[1]) and torch.isnan(s[3]) and not torch.isnan(s[0])
    nm = M.nan_mean(s)
    assert nm.n_nan == 2 and nm.n == 4
    assert float(nm.value) == pytest.approx(float(s[[0, 2]].mean()))
    assert torch.isnan(M.simam_delta(hi, hz, hz)).all()


def test_simam_and_delta_by_hand():
    m_zsl = torch.tensor([[1.0, 2.0, 3.0]])
    m_icl = torch.tensor([[1.0, 2.0, 4.0]])
    m_ft = torch.tensor([[2.0, 2.0, 3.0]])
    cos = lambda a, b: float(a @ b / (a.norm() * b.norm()))  # noqa: E731
    assert float(M.simam(m_icl, m_zsl)[0]) == pytest.approx(cos(m_icl[0], m_zsl[0]))
    assert float(M.simam(m_icl, m_ft)[0]) == pytest.approx(cos(m_icl[0], m_ft[0]))
    # ICL moved the third score, FT the first: orthogonal deltas -> 0, though SimAM after FT is ~0.95
    assert float(M.simam_delta(m_icl, m_zsl, m_ft)[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(M.simam(m_icl, m_ft)[0]) > 0.9


def test_rec2ftp_on_hand_built_table():
    #            0  1  2  3  4  5  6  7
    zsl = torch.tensor([0, 0, 0, 0, 0, 1, 1, 0]).bool()
    ft = torch.tensor([1, 1, 1, 0, 0, 1, 0, 1]).bool()
    icl = torch.tensor([1, 0, 1, 1, 0, 1, 1, 0]).bool()
    r = M.rec2ftp(zsl, icl, ft)
    # FT right & ZSL wrong: {0, 1, 2, 7}; ICL right among them: {0, 2} -> 2/4
    assert r.n_ft_fixed == 4 and r.value == pytest.approx(0.5)
    # ZSL wrong: {0, 1, 2, 3, 4, 7}; ICL right among them: {0, 2, 3} -> 3/6
    assert r.n_zsl_wrong == 6 and r.chance == pytest.approx(0.5)
    empty = M.rec2ftp(torch.ones(3).bool(), torch.ones(3).bool(), torch.ones(3).bool())
    assert math.isnan(empty.value) and math.isnan(empty.chance)


def test_kendall_tau_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (6, 20), generator=g).double()
    y = torch.randint(0, 5, (6, 20), generator=g).double()
    ours = M.kendall_tau(x, y)
    for i in range(6):
        assert float(ours[i]) == pytest.approx(kendalltau(x[i].numpy(), y[i].numpy()).statistic, abs=1e-12)
    assert torch.isnan(M.kendall_tau(torch.ones(5), torch.arange(5.0)))


def test_random_updates_have_ft_norm_and_near_zero_raw_score():
    g = torch.Generator().manual_seed(4)
    hz, hi, hf = (torch.randn(400, 256, generator=g) for _ in range(3))
    hr = random_updates_like(hz, hf, generator=torch.Generator().manual_seed(0))
    assert torch.allclose((hr - hz).norm(dim=-1), (hf - hz).norm(dim=-1), rtol=1e-5)
    assert abs(float(M.simaou(hi, hz, hr).mean())) < 0.02


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shapes must match"):
        M.simaou(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 5))
