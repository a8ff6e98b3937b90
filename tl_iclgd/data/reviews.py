"""Short review sentences, clearly positive or clearly negative, written for the ``reviews`` task.

Two sources, both written here (nothing is downloaded):

- ``HANDWRITTEN_POS`` / ``HANDWRITTEN_NEG``: 48 whole sentences per class whose sentiment is carried
  by the verb or the phrase ("I walked out halfway through."), not by one adjective;
- compositional sentences: a frame ("Honestly, {s} felt {a}.") filled with a subject (the plot, the
  service, the battery, ...) and an adjective from a positive or a negative list. ``compositional``
  draws 112 distinct sentences per class with a fixed seed, every adjective used equally often.

:func:`sentences` returns 160 positive and 160 negative sentences, always the same ones in the same
order (``random.Random`` with a fixed seed; no hashing, no global state).
"""

from __future__ import annotations

import random

HANDWRITTEN_POS = (
    "I loved every minute of it.",
    "I would happily watch it again.",
    "It exceeded all my expectations.",
    "I recommend it to everyone I know.",
    "We left the theatre smiling.",
    "My whole family enjoyed it.",
    "It made me laugh out loud.",
    "I could not put this book down.",
    "The best meal I have had all year.",
    "Worth every penny.",
    "A real treat from beginning to end.",
    "I was hooked from the first scene.",
    "They treated us like old friends.",
    "It works exactly as promised.",
    "I have already ordered a second one.",
    "Five stars, no question.",
    "The kids begged to go back.",
    "A joy to read.",
    "It left me with a warm glow.",
    "Everything about the trip was perfect.",
    "I keep thinking about how good it was.",
    "The waiter went out of his way to help.",
    "It still works like new after a year.",
    "The room was spotless and quiet.",
    "A masterpiece of modern cinema.",
    "I cried happy tears at the end.",
    "We will definitely come back.",
    "Easily the best album of the decade.",
    "The cast gives a career best performance.",
    "It was love at first sight.",
    "Every song is a gem.",
    "I finished it in one sitting and wanted more.",
    "The staff could not have been kinder.",
    "It is a pleasure to use every day.",
    "This is what great writing looks like.",
    "The setup took two minutes and it just works.",
    "I have recommended it to all my friends.",
    "The dessert alone was worth the trip.",
    "A heartfelt and funny film.",
    "It made my week.",
    "Simply the finest hotel in town.",
    "The ending was pure magic.",
    "A perfect gift.",
    "I was smiling the whole time.",
    "It deserves every award it won.",
    "A wonderful way to spend an evening.",
    "I am thrilled with this purchase.",
    "The crowd cheered for ten minutes.",
)

HANDWRITTEN_NEG = (
    "I hated every minute of it.",
    "I walked out halfway through.",
    "It was a complete waste of time.",
    "I want my money back.",
    "We left before the end.",
    "Nobody in my family liked it.",
    "It put me to sleep.",
    "I gave up on this book after ten pages.",
    "The worst meal I have had all year.",
    "Not worth a single penny.",
    "A chore from beginning to end.",
    "I was bored from the first scene.",
    "They treated us like intruders.",
    "It broke on the second day.",
    "I returned it the next morning.",
    "One star, and that is generous.",
    "The kids begged to leave.",
    "A slog to read.",
    "It left a bad taste in my mouth.",
    "Everything about the trip went wrong.",
    "I regret buying it.",
    "The waiter ignored us all night.",
    "It stopped working after a week.",
    "The room was dirty and noisy.",
    "An embarrassment for everyone involved.",
    "I rolled my eyes at the end.",
    "We will never come back.",
    "Easily the worst album of the decade.",
    "The cast looks like they would rather be elsewhere.",
    "It was a disaster from the start.",
    "Every song sounds the same.",
    "I could not wait for it to be over.",
    "The staff were rude and unhelpful.",
    "It is a pain to use every day.",
    "This is what lazy writing looks like.",
    "The setup took hours and it still fails.",
    "I have warned all my friends about it.",
    "The dessert was stale and cold.",
    "A cynical and joyless film.",
    "It ruined my week.",
    "Simply the shabbiest hotel in town.",
    "The ending made no sense at all.",
    "A terrible gift.",
    "I was checking my watch the whole time.",
    "It deserves to be forgotten.",
    "A miserable way to spend an evening.",
    "I am furious about this purchase.",
    "The crowd booed for ten minutes.",
)

SUBJECTS = (
    "the film", "the acting", "the plot", "the soundtrack", "the ending", "the script", "the dialogue",
    "the food", "the service", "the hotel room", "this book", "the camera", "the battery", "the staff",
    "the story", "the main character", "the camera work", "the concert", "the game", "the sequel",
)

ADJECTIVES_POS = (
    "wonderful", "brilliant", "superb", "delightful", "excellent", "charming", "gripping", "beautiful",
    "fantastic", "lovely", "moving", "impressive", "outstanding", "enjoyable", "clever", "thrilling",
)

ADJECTIVES_NEG = (
    "awful", "boring", "dull", "terrible", "tedious", "clumsy", "weak", "lifeless",
    "dreadful", "poor", "disappointing", "bland", "messy", "annoying", "forgettable", "horrible",
)

FRAMES = (
    "{S} was {a}.",
    "I thought {s} was {a}.",
    "Honestly, {s} felt {a}.",
    "{S} is {a} from start to finish.",
    "Everyone agreed that {s} was {a}.",
    "{S} turned out to be {a}.",
    "To be honest, {s} was really {a}.",
)

N_COMPOSITIONAL = 112  # per class: 7 frames x 16 adjectives, each adjective used 7 times


def _fill(frame: str, subject: str, adjective: str) -> str:
    return frame.format(S=subject[0].upper() + subject[1:], s=subject, a=adjective)


def compositional(adjectives: tuple[str, ...], seed: int, n: int = N_COMPOSITIONAL) -> list[str]:
    """``n`` distinct frame/subject/adjective sentences, adjectives and frames used equally often (seeded)."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    # every (frame, adjective) combination once, each with a subject drawn without repetition per frame
    combos = [(f, a) for f in FRAMES for a in adjectives]
    rng.shuffle(combos)
    subjects_left = {f: list(SUBJECTS) for f in FRAMES}
    for f in FRAMES:
        rng.shuffle(subjects_left[f])
    for f, a in combos[:n]:
        if not subjects_left[f]:
            subjects_left[f] = list(SUBJECTS)
            rng.shuffle(subjects_left[f])
        s = _fill(f, subjects_left[f].pop(), a)
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def sentences() -> tuple[list[str], list[str]]:
    """(positive, negative): 160 sentences each, the same every call."""
    pos = list(HANDWRITTEN_POS) + compositional(ADJECTIVES_POS, seed=101)
    neg = list(HANDWRITTEN_NEG) + compositional(ADJECTIVES_NEG, seed=202)
    return pos, neg


__all__ = ["sentences", "compositional", "HANDWRITTEN_POS", "HANDWRITTEN_NEG", "SUBJECTS", "ADJECTIVES_POS",
           "ADJECTIVES_NEG", "FRAMES"]
