"""Vanilla GD and layer-causal GD against autograd and real-parameter training oracles."""

import copy

import pytest
import torch

from tl_iclgd.gd import GDConfig, finetune, select_params
from tl_plugins.backends import detect


def _is_weight(name):
    """A weight (not a bias): HookedTransformer names "W_*", Hugging Face / bridge names "*weight"."""
    return "W_" in name or name.endswith("weight")


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _demo_loss(logits, task, j, label_only):
    toks = torch.tensor([task.demo_sequence(j)])
    lp = torch.log_softmax(logits[0, :-1], -1).gather(-1, toks[0, 1:, None])[:, 0]
    if label_only:
        mask = torch.tensor(task.demo_label_mask(j)[1:], dtype=torch.float32)
        return -(lp * mask).sum() / mask.sum()
    return -lp.mean()


def _train_for_real(model, task, lr, selector="kv", label_only=False, hf_twin=None):
    """The oracle: SGD (torch.optim) on the real parameters of a deep copy. A bridge's oracle is its
    plain Hugging Face twin (``hf_twin``, see conftest.HFTwin): a deep-copied bridge is not independent."""
    if detect(model).name == "bridge":
        names = list(select_params(model, selector))
        steps = [lambda t, j=j: _demo_loss(t.logits(torch.tensor([task.demo_sequence(j)])), task, j, label_only)
                 for j in range(len(task.demos))]
        return hf_twin(model).sgd(names, steps, lr)
    m = copy.deepcopy(model)
    sel = select_params(m, selector)
    opt = torch.optim.SGD(list(sel.values()), lr=lr)
    for j in range(len(task.demos)):
        toks = torch.tensor([task.demo_sequence(j)])
        opt.zero_grad()
        logits = m(toks)
        loss = _demo_loss(logits, task, j, label_only)
        loss.backward()
        opt.step()
    return {n: p.detach() for n, p in sel.items()}


@pytest.mark.parametrize("which", ["llama3", "gpt3"])
def test_one_sgd_step_is_minus_lr_times_the_gradient(which, request, make_task, make_twin):
    model = request.getfixturevalue(which)
    task = make_task(n_demos=1)
    lr = 0.05
    res = finetune(model, task, GDConfig(lr=lr))
    m = make_twin(model)  # a deep copy (a bridge: built again, see conftest.twin)
    sel = select_params(m, "kv")
    toks = torch.tensor([task.demo_sequence(0)])
    loss = m(toks, return_type="loss")
    grads = torch.autograd.grad(loss, list(sel.values()))
    for (name, p), g in zip(sel.items(), grads):
        torch.testing.assert_close(res.deltas[name], -lr * g, rtol=1e-4, atol=1e-7)
    assert res.trace.loss[0] == pytest.approx(float(loss.detach()), rel=1e-5)


@pytest.mark.parametrize("which", ["llama3", "gpt3"])
@pytest.mark.parametrize("loss", ["all_tokens", "label_only"])
def test_functional_training_equals_training_real_parameters(which, loss, request, make_task, make_hf_twin):
    model = request.getfixturevalue(which)
    task = make_task(n_demos=5)
    before = _state(model)
    res = finetune(model, task, GDConfig(lr=0.2, loss=loss))
    oracle = _train_for_real(model, task, 0.2, label_only=(loss == "label_only"), hf_twin=make_hf_twin)
    assert set(res.params) == set(oracle)
    for name in oracle:
        torch.testing.assert_close(res.params[name], oracle[name], rtol=1e-4, atol=1e-6)
    after = _state(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "finetune modified the user's model"


def test_only_chosen_parameters_change(llama3, make_task, make_hf_twin):
    task = make_task(n_demos=3)
    be = detect(llama3)
    res = finetune(llama3, task, GDConfig(lr=0.5, params="kv"))
    if be.name == "hooked":
        assert sorted(res.params) == sorted(
            f"blocks.{l}.attn.{p}" for l in range(3) for p in ("_W_K", "_W_V", "_b_K", "_b_V"))
    else:  # the bridge's Llama K/V projections have no biases
        assert sorted(res.params) == sorted(n for l in range(3) for c in "kv" for n in be.attention_parameters(l, c))
        assert len(res.params) == 6 and all(n.endswith("weight") for n in res.params)
    assert all(float(d.abs().max()) > 0 for n, d in res.deltas.items() if _is_weight(n))
    if be.name == "bridge":  # the oracle: SGD on the plain HF twin, every other HF tensor left as built
        twin = make_hf_twin(llama3)
        fresh = {n: p.detach().clone() for n, p in twin.named.items()}
        steps = [lambda t, j=j: _demo_loss(t.logits(torch.tensor([task.demo_sequence(j)])), task, j, False)
                 for j in range(3)]
        trained = twin.sgd(list(res.params), steps, 0.5)
        for n in res.params:
            torch.testing.assert_close(trained[n], res.params[n], rtol=1e-4, atol=1e-6)
        touched = {twin.resolve(n)[0] for n in res.params}
        assert all(torch.equal(p.detach(), fresh[n]) for n, p in twin.named.items() if n not in touched)
        q = finetune(llama3, task, GDConfig(lr=0.5, params="q", layers=(1,)))
        assert list(q.params) == list(be.attention_parameters(1, "q"))
        return
    # the oracle (all parameters trainable, but only K/V given to the optimiser) leaves the rest untouched
    m = copy.deepcopy(llama3)
    sel = select_params(m, "kv")
    opt = torch.optim.SGD(list(sel.values()), lr=0.5)
    for j in range(3):
        opt.zero_grad()
        m(torch.tensor([task.demo_sequence(j)]), return_type="loss").backward()
        opt.step()
    for n, p in m.named_parameters():
        if n in res.params:
            torch.testing.assert_close(p.detach(), res.params[n], rtol=1e-4, atol=1e-6)
        else:
            assert torch.equal(p.detach(), dict(llama3.named_parameters())[n].detach()), n
    q = finetune(llama3, task, GDConfig(lr=0.5, params="q", layers=(1,)))
    assert list(q.params) == ["blocks.1.attn.W_Q", "blocks.1.attn.b_Q"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_one_layer_lcgd_equals_gd(kind, make_task, make_model):
    model = make_model(kind, n_layers=1, seed=3)
    task = make_task(n_demos=4)
    gd = finetune(model, task, GDConfig(lr=0.3))
    lc = finetune(model, task, GDConfig(lr=0.3, layer_causal=True))
    for n in gd.params:
        torch.testing.assert_close(lc.params[n], gd.params[n], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(lc.trace.loss, gd.trace.loss, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("which", ["llama3", "gpt3"])
def test_top_layer_update_same_under_gd_and_lcgd_after_one_step(which, request, make_task):
    model = request.getfixturevalue(which)
    task = make_task(n_demos=1)
    gd = finetune(model, task, GDConfig(lr=0.3))
    lc = finetune(model, task, GDConfig(lr=0.3, layer_causal=True))
    top = [n for n in gd.deltas if gd.layers[n] == 2]
    low = [n for n in gd.deltas if gd.layers[n] == 0 and _is_weight(n)]
    assert top and low
    for n in top:
        torch.testing.assert_close(lc.deltas[n], gd.deltas[n], rtol=1e-4, atol=1e-7)
    # while lower layers differ (they get their own logit-lens loss and no gradient from above)
    assert any(float((lc.deltas[n] - gd.deltas[n]).abs().max()) > 1e-4 for n in low)


def test_perturbing_a_higher_layer_leaves_lower_lcgd_updates_bit_identical(llama3, make_task, make_twin):
    task = make_task(n_demos=4)
    perturbed = make_twin(llama3)  # a deep copy (a bridge: built again, see conftest.twin)
    be = detect(llama3)
    if be.name == "hooked":
        names = ("blocks.2.attn.W_Q", "blocks.2.attn.W_O", "blocks.2.mlp.W_in")
    else:  # the same three weights by the backend's names: W_Q, W_O and the MLP's up projection
        names = (next(iter(be.attention_parameters(2, "q"))), next(iter(be.attention_parameters(2, "o"))),
                 next(n for n in be.named_parameters() if be.layer_of(n) == 2 and "up_proj" in n))
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for name in names:
            p = dict(perturbed.named_parameters())[name]
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    lc_a = finetune(llama3, task, GDConfig(lr=0.3, layer_causal=True))
    lc_b = finetune(perturbed, task, GDConfig(lr=0.3, layer_causal=True))
    gd_a = finetune(llama3, task, GDConfig(lr=0.3))
    gd_b = finetune(perturbed, task, GDConfig(lr=0.3))
    lower = [n for n in lc_a.deltas if lc_a.layers[n] in (0, 1) and _is_weight(n)]
    assert len(lower) == 4
    for n in lower:
        assert torch.equal(lc_a.deltas[n], lc_b.deltas[n]), n
    assert all(float((gd_a.deltas[n] - gd_b.deltas[n]).abs().max()) > 1e-6 for n in lower)
    assert torch.equal(lc_a.trace.layer_loss[:, :2], lc_b.trace.layer_loss[:, :2])


def test_lcgd_resid_mid_readout_differs_and_traces_per_layer(llama3, make_task):
    task = make_task(n_demos=2)
    post = finetune(llama3, task, GDConfig(lr=0.3, layer_causal=True))
    mid = finetune(llama3, task, GDConfig(lr=0.3, layer_causal=True, readout="resid_mid"))
    assert post.trace.layer_loss.shape == (2, 3) and post.trace.grad_norm.shape == (2, 3)
    torch.testing.assert_close(post.trace.loss, post.trace.layer_loss.sum(1))
    w_v = next(iter(detect(llama3).attention_parameters(2, "v")))  # blocks.2.attn._W_V when hooked
    assert float((post.deltas[w_v] - mid.deltas[w_v]).abs().max()) > 1e-6
    df = post.to_frame()
    assert list(df.columns[:3]) == ["step", "demo", "loss"] and len(df) == 2


def test_reverse_order_and_epochs(llama3, make_task):
    task = make_task(n_demos=3)
    rev = finetune(llama3, task, GDConfig(lr=0.1, order="reverse", epochs=2))
    assert rev.trace.demo == [2, 1, 0, 2, 1, 0]


def test_bad_inputs(llama3, make_task):
    task = make_task()
    with pytest.raises(ValueError, match="lr: got 0"):
        GDConfig(lr=0)
    with pytest.raises(ValueError, match="lr: got -1"):
        GDConfig(lr=-1)
    with pytest.raises(ValueError, match="params: got 'kx'"):
        GDConfig(params="kx")
    with pytest.raises(ValueError, match="unknown parameter names"):
        finetune(llama3, task, GDConfig(params=("blocks.0.attn.W_nope",)))
    with pytest.raises(ValueError, match="loss: got 'mse'"):
        GDConfig(loss="mse")
    with pytest.raises(ValueError, match="readout"):
        GDConfig(readout="resid_pre")
    with pytest.raises(ValueError, match="demos: got an empty list"):
        finetune(llama3, [], GDConfig())
    with pytest.raises(ValueError, match="layers"):
        finetune(llama3, task, GDConfig(layers=(7,)))


def test_processed_weights_are_refused_unless_allowed(make_task, make_model):
    model = make_model("gpt2", n_layers=2, seed=4)
    from tl_plugins.weights import record_processing

    record_processing(model, fold_ln=True, center_writing_weights=True, center_unembed=True, fold_value_biases=False)
    with pytest.raises(ValueError, match="processed .*fold_ln.*parameterisation"):
        finetune(model, make_task(), GDConfig())
    res = finetune(model, make_task(), GDConfig(allow_processed=True))
    assert res.n_demos == 4
