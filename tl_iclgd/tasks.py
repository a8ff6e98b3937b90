"""Tasks for ICL vs GD: demonstrations, queries, a template, and their token ids.

A :class:`Task` holds strings; :func:`tokenize_task` turns it into a :class:`TokenizedTask` by
tokenising each *piece* (the text before the label, the label, the text after it) and concatenating
the ids. ICL prompts are then ``concat(demo ids) + query ids``, so the query tokens of the ICL run are
exactly the tokens of the zero-shot run, whatever the tokenizer would do to a joined string.

Users with no tokenizer (tiny random models) build a :class:`TokenizedTask` from ids directly.

Built-in tasks (single-token labels on SmolLM2's tokenizer): ``antonyms``, ``country_capital``,
``past_tense``, ``plural`` and ``sentiment``; ``reviews`` (320 balanced review sentences from
:mod:`tl_iclgd.data.reviews`, single-token labels on Gemma 3's and SmolLM2's tokenizers). See
:data:`BUILTIN_TASKS`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Sequence

POSITIONS = ("prompt_end", "first_label_token")


# -- strings ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    """Demonstration pool, query pool, template and (optionally) a closed label set.

    demos, queries: sequences of (input, label) string pairs. template: contains ``{input}`` and
    ``{label}`` once each; whitespace just before ``{label}`` is tokenised with the label (as BPE
    tokenizers do, " cold" is one token). labels: for classification tasks, the candidate labels;
    predictions are then the argmax over those labels' first tokens instead of the whole vocabulary.
    """

    demos: Sequence[tuple[str, str]]
    queries: Sequence[tuple[str, str]]
    template: str = "{input} -> {label}\n"
    labels: Optional[Sequence[str]] = None
    name: str = "custom"

    def __post_init__(self):
        for arg in ("demos", "queries"):
            pairs = getattr(self, arg)
            if not isinstance(pairs, (list, tuple)) or len(pairs) == 0:
                raise ValueError(f"{arg}: got {_short(pairs)}; accepted: a non-empty list of (input, label) "
                                 "string pairs")
            for i, p in enumerate(pairs):
                if (not isinstance(p, (list, tuple)) or len(p) != 2
                        or not all(isinstance(s, str) for s in p)):
                    raise ValueError(f"{arg}[{i}]: got {p!r}; accepted: an (input, label) pair of strings")
                if p[1].strip() == "":
                    raise ValueError(f"{arg}[{i}]: label {p[1]!r} is empty; accepted: a non-empty label")
        if not isinstance(self.template, str) or self.template.count("{input}") != 1 \
                or self.template.count("{label}") != 1 \
                or self.template.index("{input}") > self.template.index("{label}"):
            raise ValueError(f"template: got {self.template!r}; accepted: a string with one '{{input}}' "
                             "followed by one '{label}'")
        if self.labels is not None:
            if len(self.labels) < 2:
                raise ValueError(f"labels: got {self.labels!r}; accepted: None or at least two labels")
            known = set(self.labels)
            for arg in ("demos", "queries"):
                for i, (_, lab) in enumerate(getattr(self, arg)):
                    if lab not in known:
                        raise ValueError(f"{arg}[{i}]: label {lab!r} is not one of labels={list(self.labels)}")

    def sample(self, n_demos: Optional[int], n_queries: Optional[int], seed: int = 0) -> "Task":
        """A task with ``n_demos`` demos and ``n_queries`` queries drawn from the pools (seeded).

        None keeps the whole pool (in a seeded order). Asking for more than a pool holds is an error.
        """
        rng = random.Random(seed)
        demos = draw_subset(list(self.demos), n_demos, rng, "n_demos")
        queries = draw_subset(list(self.queries), n_queries, rng, "n_queries")
        return replace(self, demos=demos, queries=queries)

    def _pieces(self) -> tuple[str, str, str, str]:
        """(before input, between input and label, whitespace that goes with the label, after label)."""
        head, rest = self.template.split("{input}")
        mid, tail = rest.split("{label}")
        stripped = mid.rstrip()
        return head, stripped, mid[len(stripped):], tail


def draw_subset(pool: list, n: Optional[int], rng: random.Random, arg: str) -> list:
    if n is None:
        n = len(pool)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"{arg}: got {n!r}; accepted: None or a positive int")
    if n > len(pool):
        raise ValueError(f"{arg}: got {n}; the pool holds only {len(pool)} pairs")
    idx = list(range(len(pool)))
    rng.shuffle(idx)
    return [pool[i] for i in idx[:n]]


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) < 80 else r[:77] + "..."


# -- token ids --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One formatted pair as token ids.

    prompt: ids up to (not including) the label. label: the label's ids. suffix: ids after the label.
    """

    prompt: tuple[int, ...]
    label: tuple[int, ...]
    suffix: tuple[int, ...] = ()

    @property
    def demo_tokens(self) -> tuple[int, ...]:
        return self.prompt + self.label + self.suffix


@dataclass(frozen=True)
class TokenizedTask:
    """Token ids of a task: what the capture, GD and compare code consume.

    demos, queries: :class:`Example` lists. label_ids: first token of each candidate label for
    closed-set tasks (predictions are the argmax over them), or None for open-vocabulary tasks.
    bos: id prepended once to every sequence (ZSL, ICL, each GD demonstration), or None.
    position: "prompt_end" (record at the token that predicts the label) or "first_label_token"
    (append the label's first token and record there, as the original code did; the prediction is
    still read at the prompt end).
    """

    demos: tuple[Example, ...]
    queries: tuple[Example, ...]
    label_ids: Optional[tuple[int, ...]] = None
    bos: Optional[int] = None
    position: str = "prompt_end"
    name: str = "custom"

    def __post_init__(self):
        if len(self.demos) == 0:
            raise ValueError("demos: got an empty list; accepted: at least one demonstration")
        if len(self.queries) == 0:
            raise ValueError("queries: got an empty list; accepted: at least one query")
        if self.position not in POSITIONS:
            raise ValueError(f"position: got {self.position!r}; accepted: {', '.join(POSITIONS)}")
        for arg in ("demos", "queries"):
            for i, ex in enumerate(getattr(self, arg)):
                if len(ex.prompt) == 0 or len(ex.label) == 0:
                    raise ValueError(f"{arg}[{i}]: empty prompt or label ids ({ex!r})")

    @classmethod
    def from_ids(cls, demos: Sequence[tuple[Sequence[int], Sequence[int]]],
                 queries: Sequence[tuple[Sequence[int], Sequence[int]]], **kw: Any) -> "TokenizedTask":
        """Build from (prompt ids, label ids) pairs, e.g. for models without a tokenizer."""
        def mk(pairs, arg):
            if not isinstance(pairs, (list, tuple)):
                raise ValueError(f"{arg}: got {_short(pairs)}; accepted: a list of (prompt ids, label ids)")
            return tuple(Example(tuple(int(t) for t in p), tuple(int(t) for t in lab)) for p, lab in pairs)
        return cls(mk(demos, "demos"), mk(queries, "queries"), **kw)

    # -- sequences ---------------------------------------------------------------------------------
    def bos_tokens(self) -> tuple[int, ...]:
        """``(bos,)``, or ``()`` when the task was tokenised without a BOS token."""
        return () if self.bos is None else (self.bos,)

    def query_tokens(self, i: int) -> tuple[int, ...]:
        """Query i's own tokens (prompt, plus the first label token if so recorded); no BOS."""
        q = self.queries[i]
        extra = q.label[:1] if self.position == "first_label_token" else ()
        return q.prompt + extra

    def zsl_tokens(self, i: int) -> tuple[int, ...]:
        """The zero-shot sequence of query i: BOS (if any) plus :meth:`query_tokens`."""
        return self.bos_tokens() + self.query_tokens(i)

    def prefix_tokens(self, n_demos: Optional[int] = None) -> tuple[int, ...]:
        """BOS plus the concatenated demonstrations (the last ``n_demos`` of them)."""
        demos = self.demos if n_demos is None else self.demos[len(self.demos) - n_demos:]
        out: tuple[int, ...] = self.bos_tokens()
        for d in demos:
            out += d.demo_tokens
        return out

    def demo_sequence(self, j: int) -> tuple[int, ...]:
        """The GD training sequence of demonstration j (BOS plus the formatted pair)."""
        return self.bos_tokens() + self.demos[j].demo_tokens

    def demo_label_mask(self, j: int) -> tuple[bool, ...]:
        """Per position of :meth:`demo_sequence`: True where the token is part of the label."""
        d = self.demos[j]
        return (False,) * (len(self.bos_tokens()) + len(d.prompt)) + (True,) * len(d.label) + (False,) * len(d.suffix)

    def predict_offset(self) -> int:
        """Offset of the position whose logits predict the label (-1 or -2)."""
        return -2 if self.position == "first_label_token" else -1

    def icl_budget(self, n_ctx: int, context_budget: Optional[int] = None) -> int:
        """How many demonstrations (the last ones) fit before the longest query in the context.

        Raises when not even one fits or a query alone is longer than the context.
        """
        budget = n_ctx if context_budget is None else context_budget
        if not isinstance(budget, int) or budget < 1 or budget > n_ctx:
            raise ValueError(f"context_budget: got {context_budget!r}; accepted: None or an int in [1, {n_ctx}]")
        longest_q = max(len(self.query_tokens(i)) for i in range(len(self.queries)))
        if len(self.bos_tokens()) + longest_q > budget:
            raise ValueError(f"queries: the longest query prompt has {longest_q} tokens, longer than the context "
                             f"budget {budget}; accepted: prompts that fit in the context")
        longest_demo = max(len(self.demo_sequence(j)) for j in range(len(self.demos)))
        if longest_demo > n_ctx:
            raise ValueError(f"demos: a demonstration has {longest_demo} tokens, longer than the model's context "
                             f"n_ctx={n_ctx}")
        used = len(self.bos_tokens()) + longest_q
        k = 0
        for d in reversed(self.demos):
            if used + len(d.demo_tokens) > budget:
                break
            used += len(d.demo_tokens)
            k += 1
        if k == 0:
            raise ValueError(f"demos: not even one demonstration fits beside the longest query in the context "
                             f"budget {budget}; accepted: a larger context_budget or shorter demonstrations")
        return k

    def with_position(self, position: str) -> "TokenizedTask":
        return replace(self, position=position)

    def subset(self, demos: Optional[Sequence[int]] = None, queries: Optional[Sequence[int]] = None
               ) -> "TokenizedTask":
        """A task with the chosen demo and query indices (order kept as given)."""
        d = self.demos if demos is None else tuple(self.demos[i] for i in demos)
        q = self.queries if queries is None else tuple(self.queries[i] for i in queries)
        return replace(self, demos=d, queries=q)


def _encode(tokenizer: Any, text: str) -> tuple[int, ...]:
    if text == "":
        return ()
    return tuple(int(t) for t in tokenizer.encode(text, add_special_tokens=False))


def tokenize_task(task: Task, tokenizer: Any, *, position: str = "prompt_end", prepend_bos: bool = False,
                  single_token_labels: bool = True) -> TokenizedTask:
    """Tokenise ``task`` piece by piece (see the module doc). ``tokenizer`` may be a HookedTransformer.

    single_token_labels: require every label to be one token (the predictions and the paper's
    metrics read one position); raises naming the offending pair otherwise.
    """
    if not isinstance(task, Task):
        raise TypeError(f"task: got {type(task).__name__}; accepted: a tl_iclgd.Task (or pass a TokenizedTask)")
    tok = getattr(tokenizer, "tokenizer", None) or tokenizer
    if tok is None or not hasattr(tok, "encode"):
        raise ValueError("tokenizer: the model has no tokenizer; build a TokenizedTask.from_ids(...) instead")
    if position not in POSITIONS:
        raise ValueError(f"position: got {position!r}; accepted: {', '.join(POSITIONS)}")
    head, mid, label_space, tail = task._pieces()

    def _label_ids(text: str, where: str) -> tuple[int, ...]:
        """The ids of ``label_space + text``; one id only when single_token_labels (raises naming ``where``)."""
        ids = _encode(tok, label_space + text)
        if single_token_labels and len(ids) != 1:
            raise ValueError(f"{where} {label_space + text!r} tokenises to {len(ids)} tokens {list(ids)}; "
                             "accepted: single-token labels (or single_token_labels=False)")
        return ids

    def one(pair, arg, i):
        x, y = pair
        return Example(_encode(tok, head + x + mid), _label_ids(y, f"{arg}[{i}]: label"), _encode(tok, tail))

    demos = tuple(one(p, "demos", i) for i, p in enumerate(task.demos))
    queries = tuple(one(p, "queries", i) for i, p in enumerate(task.queries))
    label_ids = None
    if task.labels is not None:
        label_ids = tuple(_label_ids(lab, "labels:")[0] for lab in task.labels)
    bos = None
    if prepend_bos:
        bos = getattr(tok, "bos_token_id", None)
        if bos is None:
            raise ValueError("prepend_bos: True but the tokenizer has no bos_token_id")
    return TokenizedTask(demos, queries, label_ids, bos, position, task.name)


# -- built-in tasks ---------------------------------------------------------------------------------

def _pairs(s: str) -> list[tuple[str, str]]:
    return [tuple(p.split(":")) for p in s.split(",")]  # type: ignore[misc]


_ANTONYMS = _pairs(
    "hot:cold,big:small,tall:short,fast:slow,happy:sad,light:dark,up:down,good:bad,high:low,open:closed,"
    "rich:poor,hard:soft,strong:weak,early:late,left:right,wet:dry,full:empty,thick:thin,loud:quiet,"
    "clean:dirty,young:old,true:false,win:lose,love:hate,buy:sell,push:pull,first:last,black:white,"
    "day:night,yes:no,in:out,on:off,above:below,before:after,inside:outside,top:bottom,front:back,"
    "start:end,alive:dead,cheap:expensive,safe:dangerous,easy:difficult,wide:narrow,deep:shallow,"
    "sharp:dull,sweet:sour,north:south,east:west,male:female,friend:enemy,give:take,come:go,"
    "remember:forget,accept:reject,increase:decrease,maximum:minimum,positive:negative,success:failure,"
    "always:never,more:less,many:few,near:far,rough:smooth,warm:cool,summer:winter,question:answer,"
    "laugh:cry,arrive:leave,asleep:awake,float:sink,lend:borrow,major:minor,odd:even,public:private,"
    "simple:complex,visible:invisible,legal:illegal,possible:impossible,correct:wrong,upper:lower,"
    "inner:outer,internal:external,import:export,single:married,polite:rude,clever:stupid,kind:cruel,"
    "fat:thin,tight:loose,raw:cooked,ancient:modern,heavy:light,long:short,old:new,brave:afraid"
)

_CAPITALS = _pairs(
    "France:Paris,Germany:Berlin,Italy:Rome,Spain:Madrid,Japan:Tokyo,China:Beijing,Russia:Moscow,"
    "Egypt:Cairo,Greece:Athens,Canada:Ottawa,Ireland:Dublin,Austria:Vienna,Norway:Oslo,Sweden:Stockholm,"
    "Finland:Helsinki,Denmark:Copenhagen,Portugal:Lisbon,Poland:Warsaw,Hungary:Budapest,Belgium:Brussels,"
    "Netherlands:Amsterdam,Switzerland:Bern,Cuba:Havana,Peru:Lima,Chile:Santiago,Kenya:Nairobi,"
    "India:Delhi,Iran:Tehran,Iraq:Baghdad,Syria:Damascus,Australia:Canberra,England:London,"
    "Scotland:Edinburgh,Wales:Cardiff,Philippines:Manila,Korea:Seoul,Israel:Jerusalem,Tunisia:Tunis,"
    "Afghanistan:Kabul,Bulgaria:Sofia,Czechia:Prague,Jamaica:Kingston"
)

_PAST = _pairs(
    "walk:walked,go:went,eat:ate,see:saw,run:ran,take:took,give:gave,make:made,come:came,write:wrote,"
    "speak:spoke,drink:drank,sing:sang,swim:swam,begin:began,fly:flew,know:knew,grow:grew,draw:drew,"
    "drive:drove,ride:rode,rise:rose,choose:chose,break:broke,steal:stole,wake:woke,forget:forgot,get:got,"
    "sit:sat,stand:stood,understand:understood,hold:held,tell:told,sell:sold,buy:bought,bring:brought,"
    "think:thought,teach:taught,catch:caught,fight:fought,seek:sought,find:found,feel:felt,keep:kept,"
    "sleep:slept,leave:left,meet:met,lead:led,feed:fed,send:sent,spend:spent,build:built,lend:lent,"
    "lose:lost,pay:paid,say:said,hear:heard,win:won,play:played,jump:jumped,talk:talked,look:looked,"
    "want:wanted,need:needed,call:called,ask:asked,work:worked,help:helped,start:started,open:opened,"
    "love:loved,live:lived,move:moved,use:used,try:tried,cry:cried,stop:stopped,plan:planned,dance:danced,"
    "smile:smiled,cook:cooked,clean:cleaned,wash:washed,watch:watched,kill:killed,fall:fell,throw:threw,"
    "wear:wore,bite:bit,hide:hid,shoot:shot,shake:shook"
)

_PLURAL = _pairs(
    "cat:cats,dog:dogs,house:houses,car:cars,tree:trees,book:books,bird:birds,child:children,man:men,"
    "woman:women,foot:feet,tooth:teeth,mouse:mice,box:boxes,city:cities,baby:babies,story:stories,"
    "leaf:leaves,knife:knives,wife:wives,life:lives,day:days,key:keys,boy:boys,girl:girls,apple:apples,"
    "friend:friends,hand:hands,eye:eyes,ear:ears,idea:ideas,game:games,song:songs,bus:buses,class:classes,"
    "church:churches,watch:watches,person:people,goose:geese,ox:oxen,bank:banks,street:streets,road:roads,"
    "river:rivers,lake:lakes,king:kings,queen:queens,student:students,teacher:teachers,window:windows,"
    "door:doors,table:tables,chair:chairs,phone:phones,computer:computers,country:countries,party:parties,"
    "lady:ladies,family:families,company:companies,army:armies,potato:potatoes,hero:heroes,wolf:wolves,"
    "half:halves,shelf:shelves,thief:thieves,animal:animals,plant:plants,star:stars,word:words,"
    "letter:letters,number:numbers,rule:rules,law:laws,year:years,month:months,week:weeks,hour:hours,"
    "minute:minutes"
)

_POS = [
    "I loved this film", "What a wonderful day", "The food was delicious", "A truly great book",
    "The staff were very friendly", "This is the best phone I ever had", "An amazing performance",
    "I am so happy with it", "Beautiful and moving", "Highly recommended", "The hotel was lovely",
    "A brilliant idea", "Everything worked perfectly", "The music was fantastic", "I enjoyed every minute",
    "Great value for money", "The service was excellent", "A charming little cafe", "Such a fun game",
    "The view was stunning", "My kids adore it", "A delightful surprise", "Superb quality",
    "I would buy it again", "Clean, quiet and comfortable",
]
_NEG = [
    "I hated this film", "What a terrible day", "The food was disgusting", "A truly awful book",
    "The staff were very rude", "This is the worst phone I ever had", "A boring performance",
    "I am so disappointed", "Ugly and dull", "Not recommended at all", "The hotel was filthy",
    "A stupid idea", "Nothing worked", "The music was awful", "I regretted every minute",
    "A waste of money", "The service was horrible", "A miserable little cafe", "Such a tedious game",
    "The view was depressing", "My kids hate it", "A nasty surprise", "Poor quality",
    "I would never buy it again", "Dirty, noisy and uncomfortable",
]


def _split(name: str, pairs: list[tuple[str, str]], **kw: Any) -> Task:
    rng = random.Random(1234)
    pairs = list(pairs)
    rng.shuffle(pairs)
    k = (len(pairs) * 2) // 5  # 40% demonstrations, 60% queries
    return Task(demos=pairs[:k], queries=pairs[k:], name=name, **kw)


def antonyms() -> Task:
    """Word -> antonym ("hot -> cold"); 97 pairs; 40% form the demonstration pool, 60% the query pool (seeded split)."""
    return _split("antonyms", _ANTONYMS)


def country_capital() -> Task:
    """Country -> capital ("France -> Paris"); 42 pairs."""
    return _split("country_capital", _CAPITALS)


def past_tense() -> Task:
    """Verb -> simple past ("go -> went"); 97 pairs."""
    return _split("past_tense", _PAST)


def plural() -> Task:
    """Noun -> plural ("mouse -> mice"); 82 pairs."""
    return _split("plural", _PLURAL)


def sentiment() -> Task:
    """Short review -> " positive" / " negative" (closed label set); 50 sentences.

    SmolLM2 already gets this right zero-shot, so it leaves ICL little to learn (see the docs).
    """
    pairs = [(s, "positive") for s in _POS] + [(s, "negative") for s in _NEG]
    return _split("sentiment", pairs, labels=("positive", "negative"))


REVIEWS_TEMPLATE = "{input} -> {label}\n"  # no "Sentiment:" cue: Gemma 3 got 0.98 zero-shot with one
REVIEWS_DEMO_POOL = 60  # per class; the other 100 per class form the query pool


def reviews() -> Task:
    """Short review -> " positive" / " negative" (closed label set); 320 sentences, balanced.

    The sentences are written in :mod:`tl_iclgd.data.reviews` (48 handwritten and 112 compositional
    per class). Split per class with a fixed seed: 60 + 60 demonstrations, 100 + 100 queries, so both
    pools are balanced. Template ``"{input} -> {label}\n"``: on Gemma 3's tokenizer a
    demonstration is at most 14 tokens, so 32 of them and a query stay under its 512-token window.
    """
    from tl_iclgd.data.reviews import sentences

    pos, neg = sentences()
    rng = random.Random(4321)
    demos: list[tuple[str, str]] = []
    queries: list[tuple[str, str]] = []
    for label, pool in (("positive", pos), ("negative", neg)):
        pool = list(pool)
        rng.shuffle(pool)
        demos += [(s, label) for s in pool[:REVIEWS_DEMO_POOL]]
        queries += [(s, label) for s in pool[REVIEWS_DEMO_POOL:]]
    rng.shuffle(demos)
    rng.shuffle(queries)
    return Task(demos=demos, queries=queries, template=REVIEWS_TEMPLATE, labels=("positive", "negative"),
                name="reviews")


BUILTIN_TASKS: dict[str, Callable[[], Task]] = {
    "antonyms": antonyms,
    "country_capital": country_capital,
    "past_tense": past_tense,
    "plural": plural,
    "sentiment": sentiment,
    "reviews": reviews,
}


COPY_TASK = "copy_token"


def synthetic_task(d_vocab: int, n_demos: int, n_queries: int) -> TokenizedTask:
    """The raw-id copy task ``copy_token``, for models without a tokenizer (tiny test models): each
    pair is ``([x, 3], [x])`` with ``x`` drawn in ``[10, d_vocab)`` (seed 0)."""
    rng = random.Random(0)
    arrow = 3

    def pair():
        x = rng.randrange(10, d_vocab)
        return ([x, arrow], [x])
    return TokenizedTask.from_ids([pair() for _ in range(n_demos)], [pair() for _ in range(n_queries)],
                                  name=COPY_TASK)


def get_task(name: str) -> Task:
    """A built-in task by name (see :data:`BUILTIN_TASKS`)."""
    if name not in BUILTIN_TASKS:
        raise KeyError(f"task: unknown task {name!r}; available: {', '.join(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name]()


__all__ = ["Task", "Example", "TokenizedTask", "tokenize_task", "POSITIONS", "BUILTIN_TASKS", "get_task",
           "COPY_TASK", "synthetic_task",
           "antonyms", "country_capital", "past_tense", "plural", "sentiment", "reviews"]
