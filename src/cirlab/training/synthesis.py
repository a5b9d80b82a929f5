"""Triplet synthesis for zero-shot composing (mapping-to-composing, stage II): from image-caption data only.

For a drawn image, a rule edits its caption; the image whose caption best matches the edited caption becomes the
target, and a template turns the rule into a modification text. Rules (each needs the caption to hold a word of
the vocabulary class it swaps):
- `swap` of a word of one vocabulary class (colour, shape, size, ... from `vocab`) for another of that class,
  the text naming the clause before and after ("with a blue star at the top instead of the red star at the top");
- `remove` of one clause of a caption of several ("a, b and c");
- `add` of a clause taken from another caption.
Matching is F1 over words and word bigrams between the edited caption and every caption of the pool (the reference's own
excluded); the best one wins, ties broken by the seeded generator; a triplet whose best F1 is under `min_match`
is dropped and another drawn. The modification texts come from `TEMPLATES` below, worded unlike the synthetic
world's own paraphrases (`data/synth/world.py`), so the zero-shot protocol never sees the benchmark's phrasing.
An optional `rewrite(text) -> text` (for example an LLM through the OpenAI-compatible client) rewrites each text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from cirlab.errors import CirlabError
from cirlab.types import Query

TEMPLATES = {  # a template is used only when the edit provides every field it names
    "swap": ["with a {new} instead of the {old}", "a {new} in place of the {old}", "have {new_word} rather than "
             "{old_word}", "swap {old_word} for {new_word}", "switch the {noun} from {old_word} to {new_word}"],
    "remove": ["without the {clause}", "leave out the {clause}", "drop the {noun}", "no {noun} any more"],
    "add": ["also containing {clause}", "plus {clause}", "with one more {noun}, {clause}"],
}
RULES = ("swap", "remove", "add")
_FIELDS = re.compile(r"{(\w+)}")


@dataclass
class Synthesis:
    queries: list  # Query records (key "syn-<i>", reference, text, targets=(target,))
    match_f1: list  # the F1 of each triplet's target caption with its edited caption
    rules: dict  # rule -> count
    drawn: int  # edits tried, including the dropped ones


def _words(text: str) -> list:
    """Words and word bigrams: bigrams keep some binding ("red circle", "top left") that single words lose."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


def _clauses(caption: str) -> list:
    """"a, b and c" -> [a, b, c]."""
    return [c.strip() for c in re.split(r",\s*|\s+and\s+", caption) if c.strip()]


def _join(clauses: list) -> str:
    return clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]


def _article(clause: str) -> str:
    return re.sub(r"^(a|an|the)\s+", "", clause)


class _CaptionIndex:
    """Bag-of-words counts of the pool's captions, for F1 against one edited caption at a time."""

    def __init__(self, names: list, captions: list):
        vocab: dict = {}
        rows = [[vocab.setdefault(w, len(vocab)) for w in _words(c)] for c in captions]
        self.names, self.vocab = names, vocab
        self.counts = np.zeros((len(names), len(vocab)), dtype=np.float32)
        for i, row in enumerate(rows):
            np.add.at(self.counts[i], row, 1.0)
        self.lengths = self.counts.sum(1)

    def f1(self, text: str) -> np.ndarray:
        q = np.zeros(len(self.vocab), dtype=np.float32)
        n = 0
        for w in _words(text):
            n += 1
            if w in self.vocab:
                q[self.vocab[w]] += 1
        overlap = np.minimum(self.counts, q[None, :]).sum(1)
        return 2 * overlap / np.maximum(self.lengths + n, 1)


def _noun(clause: str, nouns) -> str | None:
    found = [w for w in clause.split() if w in nouns]
    return found[-1] if found else None


def _edit(rule: str, caption: str, other: str, vocab: dict, rng, nouns=()) -> tuple | None:
    """(edited caption, template fields) or None when the rule does not apply. `nouns`: the words that name an
    object (the world's shapes), for the short templates."""
    clauses = _clauses(caption)
    if rule == "swap":
        spots = [(c, i, cls) for c, clause in enumerate(clauses) for i, w in enumerate(clause.split())
                 for cls, values in vocab.items() if w in values]
        if not spots:
            return None
        c, i, cls = spots[int(rng.integers(len(spots)))]
        words = clauses[c].split()
        choices = [v for v in vocab[cls] if v != words[i]]
        if not choices:
            return None
        word = choices[int(rng.integers(len(choices)))]
        new = " ".join(words[:i] + [word] + words[i + 1:])
        edited = clauses[:c] + [new] + clauses[c + 1:]
        fields = {"old": _article(clauses[c]), "new": _article(new), "old_word": words[i], "new_word": word}
        noun = _noun(clauses[c], nouns)
        if noun is not None and noun != words[i]:
            fields["noun"] = noun
        return _join(edited), fields
    if rule == "remove":
        if len(clauses) < 2:
            return None
        k = int(rng.integers(len(clauses)))
        fields = {"clause": _article(clauses[k])}
        noun = _noun(clauses[k], nouns)
        if noun is not None and sum(_noun(c, nouns) == noun for c in clauses) == 1:  # "the star" names one object
            fields["noun"] = noun
        return _join(clauses[:k] + clauses[k + 1:]), fields
    extra = _clauses(other)
    clause = extra[int(rng.integers(len(extra)))]
    if clause in clauses:
        return None
    fields = {"clause": clause}
    if _noun(clause, nouns) is not None:
        fields["noun"] = _noun(clause, nouns)
    return _join(clauses + [clause]), fields


def synthesize_triplets(captions: dict, n: int, vocab: dict, seed: int = 0, min_match: float = 0.8,
                        rules: tuple = RULES, rewrite=None, max_draws: int | None = None,
                        noun_class: str = "shape") -> Synthesis:
    """`n` triplets over the images of `captions` ({image: caption}); `vocab` maps a class to its words, and
    its `noun_class` words name objects (for the short templates; none when absent)."""
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise CirlabError(f"unknown synthesis rule(s) {unknown}; known: {', '.join(RULES)}")
    if n < 1:
        raise CirlabError(f"the number of synthetic triplets must be at least 1, got {n}")
    names = sorted(captions)
    if len(names) < 2:
        raise CirlabError("triplet synthesis needs at least two captioned images")
    index = _CaptionIndex(names, [captions[x] for x in names])
    position = {x: i for i, x in enumerate(names)}
    nouns = set(vocab.get(noun_class, ()))
    rng = np.random.default_rng(seed)
    out, scores, counts, drawn = [], [], {r: 0 for r in rules}, 0
    max_draws = max_draws or 20 * n
    while len(out) < n:
        if drawn >= max_draws:
            raise CirlabError(f"only {len(out)} of {n} triplets after {drawn} draws: the captions offer too few "
                              f"edits whose result matches another caption (min_match {min_match})")
        drawn += 1
        ref = names[int(rng.integers(len(names)))]
        rule = rules[int(rng.integers(len(rules)))]
        edited = _edit(rule, captions[ref], captions[names[int(rng.integers(len(names)))]], vocab, rng, nouns)
        if edited is None:
            continue
        text_caption, fields = edited
        f1 = index.f1(text_caption)
        f1[position[ref]] = -1.0
        best = np.flatnonzero(f1 == f1.max())
        target = names[int(best[int(rng.integers(len(best)))])]
        if f1.max() < min_match or captions[target] == captions[ref]:
            continue
        templates = [t for t in TEMPLATES[rule] if all(f in fields for f in _FIELDS.findall(t))]
        text = templates[int(rng.integers(len(templates)))].format(**fields)
        if rewrite is not None:
            text = rewrite(text)
        out.append(Query(f"syn-{len(out)}", ref, text, (target,)))
        scores.append(round(float(f1.max()), 4))
        counts[rule] += 1
    return Synthesis(out, scores, counts, drawn)
