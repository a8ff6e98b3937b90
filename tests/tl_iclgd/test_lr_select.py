"""Learning-rate selection on held-out demonstrations: the argmax (against an oracle), queries never read."""

import math

import pytest
import torch

from tl_iclgd import GDConfig, capture, finetune
from tl_iclgd.compare import compare, predictions
from tl_iclgd.lr_select import select_lr, split_demo_pool
from tl_iclgd.tasks import TokenizedTask

GRID = (1e-3, 0.1, 1.0, 3.0)


def parity_task(n_demos=24, n_queries=4, query_token=None, seed=0):
    """Prompt (x, 3) -> label 5 if x is even else 6; closed label set (5, 6)."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randint(10, 90, (n_demos,), generator=g).tolist()
    demos = [([x, 3], [5 if x % 2 == 0 else 6]) for x in xs]
    q = query_token if query_token is not None else 11
    queries = [([q + i, 3], [5]) for i in range(n_queries)]
    return TokenizedTask.from_ids(demos, queries, label_ids=(5, 6))


def oracle(model, task, train, held, lr, method):
    """Held-out accuracy and label loss of one rate, computed with the public API on a hand-built task."""
    tt = TokenizedTask(tuple(task.demos[i] for i in train), tuple(task.demos[i] for i in held),
                       label_ids=task.label_ids)
    ft = finetune(model, tt, GDConfig(lr=lr, layer_causal=(method == "lcgd")))
    queries = [tt.query_tokens(i) for i in range(len(tt.queries))]
    cap = capture(model, (), queries, params=ft.params)
    gold = torch.tensor([q.label[0] for q in tt.queries])
    acc = float((predictions(cap, tt.label_ids) == gold).double().mean())
    ids = torch.tensor(tt.label_ids)
    target = (gold[:, None] == ids[None]).long().argmax(-1)
    loss = float(torch.nn.functional.cross_entropy(cap.logits.double()[:, ids], target))
    return acc, loss


@pytest.mark.parametrize("method", ["gd", "lcgd"])
def test_picks_the_argmax_of_held_out_accuracy(llama3, method):
    task = parity_task()
    sel = select_lr(llama3, task, GRID, method=method, n_demos=8, n_heldout=16, seed=1)
    train, held = split_demo_pool(len(task.demos), 8, 16, 1)
    assert (sel.train, sel.heldout) == (train, held)
    expect = {lr: oracle(llama3, task, train, held, lr, method) for lr in GRID}
    for row in sel.rows:
        acc, loss = expect[row["lr"]]
        assert row["heldout_acc"] == pytest.approx(acc) and row["heldout_loss"] == pytest.approx(loss, rel=1e-6)
    accs = [a for a, _ in expect.values()]
    assert len(set(accs)) > 1, "the grid must give different accuracies for this test to mean anything"
    best = max(accs)
    assert expect[sel.lr][0] == best
    tied = [lr for lr in GRID if expect[lr][0] == best]
    assert sel.lr == min(tied, key=lambda lr: (expect[lr][1], lr))
    df = sel.to_frame()
    assert df.chosen.sum() == 1 and float(df[df.chosen].lr.iloc[0]) == sel.lr


def test_never_reads_the_queries(llama3):
    # queries made of ids outside the vocabulary: any forward over them would raise
    poisoned = parity_task(query_token=10**6)
    clean = parity_task()
    with pytest.raises(IndexError):
        capture(llama3, (), [poisoned.query_tokens(0)])
    a = select_lr(llama3, poisoned, GRID[:2], n_demos=8, n_heldout=8)
    b = select_lr(llama3, clean, GRID[:2], n_demos=8, n_heldout=8)
    assert a.rows == b.rows and a.lr == b.lr and a.zsl_acc == b.zsl_acc
    assert not set(a.train) & set(a.heldout)


def test_split_is_seeded_disjoint_and_bounded():
    tr, he = split_demo_pool(20, 8, 12, seed=4)
    assert (tr, he) == split_demo_pool(20, 8, 12, seed=4)
    assert len(tr) == 8 and len(he) == 12 and not set(tr) & set(he)
    assert split_demo_pool(20, 8, 12, seed=5) != (tr, he)
    with pytest.raises(ValueError, match=r"n_demos \+ n_heldout: got 8 \+ 13; the demonstration pool holds only 20"):
        split_demo_pool(20, 8, 13, seed=0)


@pytest.mark.parametrize("kw, match", [
    (dict(grid=()), "grid: got"), (dict(grid=(0.1, -1.0)), "grid: got"), (dict(grid=(0.1, 0.1)), "distinct"),
    (dict(grid=(float("nan"),)), "grid: got"), (dict(method="adam"), "method: got 'adam'"),
    (dict(n_demos=0), "n_demos: got 0"),
])
def test_bad_input(llama3, kw, match):
    args = {"grid": GRID, **kw}
    with pytest.raises(ValueError, match=match):
        select_lr(llama3, parity_task(), args.pop("grid"), **args)


def test_compare_takes_per_method_rates(llama3):
    task = parity_task(n_demos=8, n_queries=4)
    both = compare(llama3, task, GDConfig(lr=0.5), lrs={"gd": 0.1, "lcgd": 1.0}, n_demos=4, n_queries=4,
                   kendall=False)
    assert both.settings["lr"] == {"gd": 0.1, "lcgd": 1.0}
    for method, lr in (("gd", 0.1), ("lcgd", 1.0)):
        one = compare(llama3, task, GDConfig(lr=lr), methods=(method,), n_demos=4, n_queries=4, kendall=False)
        a = both.runs[both.runs.method == method].set_index(["metric"]).value
        b = one.runs.set_index(["metric"]).value
        assert all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in b.index)
    with pytest.raises(ValueError, match="lrs: got keys"):
        compare(llama3, task, GDConfig(), methods=("gd",), lrs={"lcgd": 0.1}, n_demos=4, n_queries=4)
