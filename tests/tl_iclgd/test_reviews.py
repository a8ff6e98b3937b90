"""The ``reviews`` sentiment task: balanced, deterministic, disjoint pools, label words single tokens."""

import pytest

from tl_iclgd.data import reviews as data
from tl_iclgd.tasks import BUILTIN_TASKS, get_task, tokenize_task


class SpaceWordTokenizer:
    """Each space-prefixed word is one id (a fresh id per distinct piece), every other character its own id."""

    bos_token_id = 1

    def __init__(self):
        self.ids = {}

    def _id(self, piece):
        return self.ids.setdefault(piece, 1000 + len(self.ids))

    def encode(self, text, add_special_tokens=False):
        out, word = [], ""
        for c in text:
            if c == " ":
                if word:
                    out.append(self._id(word))
                word = " "
            elif c.isalpha():
                word += c
            else:
                if word:
                    out.append(self._id(word))
                    word = ""
                out.append(ord(c))
        if word:
            out.append(self._id(word))
        return out


def test_sentences_are_deterministic_distinct_and_balanced():
    pos, neg = data.sentences()
    pos2, neg2 = data.sentences()
    assert pos == pos2 and neg == neg2
    assert len(pos) == len(neg) == 160
    assert len(set(pos)) == 160 and len(set(neg)) == 160 and not set(pos) & set(neg)
    # compositional sentences use every adjective equally often (7 frames each), each from its own class
    for adjs, sents in ((data.ADJECTIVES_POS, pos), (data.ADJECTIVES_NEG, neg)):
        counts = {a: sum(s.rstrip(".").split()[-1] == a or f" {a} from" in s for s in sents) for a in adjs}
        assert set(counts.values()) == {7}, counts
    other = set(data.ADJECTIVES_NEG)
    assert not any(w.strip(".,") in other for s in pos for w in s.split())


def test_reviews_task_pools_balanced_disjoint_and_fixed():
    t = get_task("reviews")
    assert "reviews" in BUILTIN_TASKS
    assert t == get_task("reviews")  # same split every call
    assert t.labels == ("positive", "negative")
    for pool, n in ((t.demos, 60), (t.queries, 100)):
        assert sum(lab == "positive" for _, lab in pool) == n
        assert sum(lab == "negative" for _, lab in pool) == n
    assert not {s for s, _ in t.demos} & {s for s, _ in t.queries}
    pos, neg = data.sentences()
    assert {s for s, lab in (*t.demos, *t.queries) if lab == "positive"} == set(pos)
    assert {s for s, lab in (*t.demos, *t.queries) if lab == "negative"} == set(neg)
    assert t.sample(32, 50, seed=3) == t.sample(32, 50, seed=3)


def test_reviews_labels_tokenise_as_one_word_each():
    tok = SpaceWordTokenizer()
    tt = tokenize_task(get_task("reviews").sample(32, 20, 0), tok, prepend_bos=True)
    assert tt.label_ids == (tok.ids[" positive"], tok.ids[" negative"])
    assert {q.label for q in tt.queries} <= {(i,) for i in tt.label_ids}
    # the prompt ends with "->" and the label carries the space
    assert tt.queries[0].prompt[-2:] == (ord("-"), ord(">")) and tt.queries[0].suffix == (ord("\n"),)


@pytest.mark.slow
def test_reviews_on_gemma3_tokenizer_single_tokens_and_under_the_window():
    gemma3 = pytest.importorskip("tl_plugins.models.gemma3", reason="the Gemma 3 zoo entry is not installed")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gemma3.ensure_hf_folder(progress=False)))
    t = get_task("reviews")
    tt = tokenize_task(t, tok, prepend_bos=True)  # raises if any label is not one token
    assert tt.label_ids == tuple(tok.encode(w, add_special_tokens=False)[0] for w in (" positive", " negative"))
    assert all(len(tok.encode(w, add_special_tokens=False)) == 1 for w in (" positive", " negative"))
    # 32 of the longest demonstrations plus BOS plus the longest query stay under the 512-token window
    longest_demo = max(len(d.demo_tokens) for d in tt.demos)
    longest_query = max(len(tt.query_tokens(i)) for i in range(len(tt.queries)))
    assert 1 + 32 * longest_demo + longest_query <= 512
