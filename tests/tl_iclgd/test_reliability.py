"""Bad and unusual input to tl_iclgd: a diverging fine-tuning run is an error naming the learning
rate (not NaN parameters that a later step blames on a plugin), a rank correlation refuses NaN, and
`iclgd compare` writes a file only where asked and never overwrites one silently."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import tl_plugins
from tl_iclgd import GDConfig, finetune, kendall_tau
from tl_plugins.cli import build_cli


def test_a_diverging_run_names_the_learning_rate():
    """An overflowing step (here forced: one weight of the model is inf, so the first loss is not
    finite; a huge learning rate overflows the same way, but not on every model) stops the run."""
    model = tl_plugins.models.load("tiny-llama")
    demos = [list(range(4, 20)), list(range(20, 36))]
    finetune(model, demos, GDConfig(lr=0.01))  # a sane run first
    target = max(model.named_parameters(), key=lambda np_: np_[1].numel())[1]
    with torch.no_grad():
        target.view(-1)[0] = float("inf")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(FloatingPointError, match=r"^lr: fine-tuning diverged at step 1 of 2 .*lr=0\.01"):
        finetune(model, demos, GDConfig(lr=0.01, allow_processed=True))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_kendall_tau_refuses_nan_and_matches_scipy_otherwise():
    from scipy.stats import kendalltau

    x, y = torch.tensor([1.0, 2.0, float("nan"), 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    with pytest.raises(ValueError, match="^x: contains NaN"):
        kendall_tau(x, y)
    with pytest.raises(ValueError, match="^y: contains NaN"):
        kendall_tau(y, x)
    a, b = torch.tensor([3.0, 1, 2, 2, 5]), torch.tensor([1.0, 2, 2, 4, 3])
    assert abs(float(kendall_tau(a, b)) - kendalltau(a.numpy(), b.numpy()).statistic) < 1e-12


def test_compare_writes_no_file_unless_asked_and_never_clobbers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = build_cli()
    existing = tmp_path / "r.json"
    existing.write_text("keep me")
    res = CliRunner().invoke(cli, ["iclgd", "compare", "--model", "tiny-llama", "--json", str(existing)])
    assert res.exit_code == 2 and "exists; pass --force" in res.output and existing.read_text() == "keep me"
    res = CliRunner().invoke(cli, ["iclgd", "compare", "--model", "nope"])
    assert res.exit_code == 2 and "unknown model 'nope'" in res.output
    res = CliRunner().invoke(cli, ["iclgd", "compare", "--model", "tiny-llama", "--json", str(tmp_path / "no" / "x")])
    assert res.exit_code == 2 and "does not exist" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
