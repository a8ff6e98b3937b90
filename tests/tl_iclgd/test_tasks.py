"""Tasks: token alignment between ZSL and ICL, truncation to a context budget, bad input."""

import pytest

from tl_iclgd.tasks import BUILTIN_TASKS, Task, TokenizedTask, get_task, tokenize_task


class CharTokenizer:
    """One token per character (ids = code points): simple enough to check alignment by hand."""

    bos_token_id = 1

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


class WordTokenizer:
    """Space-prefixed words are single tokens, anything else splits into characters."""

    vocab = {" cold": 1000, " small": 1001, " big": 1002}

    def encode(self, text, add_special_tokens=False):
        if text in self.vocab:
            return [self.vocab[text]]
        return [ord(c) for c in text]


def test_query_tokens_align_between_zsl_and_icl():
    t = Task(demos=[("hot", "cold"), ("up", "down")], queries=[("big", "small")], template="{input} -> {label}\n")
    tt = tokenize_task(t, CharTokenizer(), prepend_bos=True, single_token_labels=False)
    q = tt.query_tokens(0)
    assert tt.zsl_tokens(0) == (1,) + q
    # the ICL sequence is BOS once, then exactly the joined text
    assert tt.prefix_tokens() + q == (1,) + tuple(map(ord, "hot -> cold\nup -> down\nbig ->"))
    # the label carries the space before it; prompt and label concatenate to the formatted demo
    d = tt.demos[0]
    assert "".join(map(chr, d.prompt)) == "hot ->" and "".join(map(chr, d.label)) == " cold"
    assert "".join(map(chr, d.suffix)) == "\n"
    assert tt.demo_label_mask(0) == (False,) * 7 + (True,) * 5 + (False,)


def test_first_label_token_position():
    t = Task(demos=[("hot", "cold")], queries=[("big", "small")])
    tt = tokenize_task(t, WordTokenizer(), position="first_label_token")
    assert tt.query_tokens(0)[-1] == 1001 and tt.predict_offset() == -2


def test_multi_token_labels_are_refused_when_single_tokens_required():
    t = Task(demos=[("hot", "cold")], queries=[("cold", "hot")])
    with pytest.raises(ValueError, match=r"queries\[0\]: label ' hot' tokenises to 4 tokens"):
        tokenize_task(t, WordTokenizer())
    tt = tokenize_task(t, WordTokenizer(), single_token_labels=False)
    assert len(tt.queries[0].label) == 4


def test_context_budget_truncates_icl_and_reports_it():
    demos = [([10 + i] * 3, [50]) for i in range(6)]  # 4 tokens each
    tt = TokenizedTask.from_ids(demos, [([7, 8], [9])])
    assert tt.icl_budget(128) == 6
    assert tt.icl_budget(128, context_budget=2 + 4 * 3) == 3  # the last three demos fit
    assert tt.prefix_tokens(2) == tuple([14] * 3 + [50] + [15] * 3 + [50])
    with pytest.raises(ValueError, match="not even one demonstration fits"):
        tt.icl_budget(128, context_budget=4)
    with pytest.raises(ValueError, match="longest query prompt has 2 tokens, longer than the context budget 1"):
        tt.icl_budget(128, context_budget=1)
    with pytest.raises(ValueError, match="context_budget: got 500"):
        tt.icl_budget(128, context_budget=500)


def test_bad_tasks():
    with pytest.raises(ValueError, match="demos: got \\[\\]"):
        Task(demos=[], queries=[("a", "b")])
    with pytest.raises(ValueError, match="template"):
        Task(demos=[("a", "b")], queries=[("a", "b")], template="{label} {input}")
    with pytest.raises(ValueError, match="not one of labels"):
        Task(demos=[("a", "b")], queries=[("a", "c")], labels=("b", "d"))
    with pytest.raises(ValueError, match="demos: got an empty list"):
        TokenizedTask.from_ids([], [([1], [2])])
    with pytest.raises(ValueError, match="n_queries: got 500; the pool holds only"):
        get_task("antonyms").sample(4, 500)
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")


def test_builtin_pools_are_disjoint_and_sized():
    for name, fn in BUILTIN_TASKS.items():
        t = fn()
        assert len(t.demos) >= 16 and len(t.queries) >= 20, name
        assert not set(t.demos) & set(t.queries), name
    assert len(get_task("antonyms").queries) >= 50
    s = get_task("antonyms").sample(16, 50, seed=3)
    assert s == get_task("antonyms").sample(16, 50, seed=3) and s != get_task("antonyms").sample(16, 50, seed=4)
