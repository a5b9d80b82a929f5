"""Triplet synthesis for zero-shot composing (mapping-to-composing, stage II): from image-caption data only.

For a drawn image, a rule edits its caption; the image whose caption best matches the edited caption becomes the
target, and a template turns the edit into a modification text. Rules (each needs the caption to hold a word or
phrase of the vocabulary class it swaps):
- `swap` of a word or phrase of one vocabulary class (colour, shape, size, position, ... from `vocab`; "top left"
  is one position) for another of that class;
- `remove` of one clause of a caption of several ("a, b and c");
- `add` of a clause taken from another caption.
Matching is F1 over words and word bigrams between the edited caption and every caption of the pool (the
reference's own excluded); the best one wins, ties broken by the seeded generator; a triplet whose best F1 is under
`min_match` is dropped and another drawn. Every other image within `also_within` of the best F1 also fits the edit:
it follows the target in `Query.targets`, and training never uses it as a negative.

The texts are instructions, as a person (or an LLM asked for one) would write them, from `TEMPLATES`: one list per
swapped class and per rule. They name the object by its shortest unique description in the caption ("the star",
"the red circle", as a person would) and are worded unlike the synthetic world's own paraphrases
(`data/synth/world.py`: no template starts as one of the world's does), so the zero-shot protocol never sees the
benchmark's phrasing. An earlier set of declarative templates ("with a blue star at the top instead of the red star
at the top") transferred worse (README, "Mapping to composing"). An optional `rewrite(text) -> text` (for example an
LLM through the OpenAI-compatible client) rewrites each text.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from cirlab.errors import CirlabError
from cirlab.types import Query

TEMPLATES = {  # a template is used only when the edit provides every field it names
    # swaps, by the vocabulary class of the swapped word or phrase; "swap" for classes without their own list
    "swap_colour": ["colour the {ref} {new_word}", "with the {ref} in {new_word}", "have the {ref} coloured "
                    "{new_word}", "switch the {ref} from {old_word} to {new_word}", "{new_word} rather than "
                    "{old_word} for the {ref}"],
    "swap_shape": ["a {new_word} where the {ref} was", "exchange the {ref} for a {new_word}", "have the {ref} "
                   "become a {new_word}", "swap the {ref} for a {new_word}"],
    "swap_size": ["{size_verb} the {ref}", "a {new_word} version of the {ref}", "have the {ref} at {new_word} size",
                  "scale the {ref} {size_way}"],
    "swap_position": ["place the {ref} at the {new_word}", "with the {ref} over at the {new_word}", "send the {ref} "
                      "to the {new_word}", "have the {ref} sit at the {new_word}"],
    "swap": ["with a {new} instead of the {old}", "a {new} in place of the {old}", "swap {old_word} for {new_word}"],
    "remove": ["without the {clause}", "leave out the {ref}", "erase the {ref}", "drop the {ref}",
               "no {ref} any more"],
    "add": ["plus {clause}", "also with {clause}", "draw {clause} as well", "one more object: {clause}"],
}
SIZE_WORDS = {"large": ("enlarge", "up"), "big": ("enlarge", "up"), "small": ("shrink", "down")}
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


def _spots(words: list, vocab: dict) -> list:
    """(start, length, class) of every vocabulary word or phrase in `words`, longest phrases first and never
    overlapping ("top left" is one position, not "top" and "left")."""
    phrases = sorted(((tuple(v.split()), cls) for cls, values in vocab.items() for v in values),
                     key=lambda x: -len(x[0]))
    taken, out = set(), []
    for phrase, cls in phrases:
        n = len(phrase)
        for i in range(len(words) - n + 1):
            if tuple(words[i:i + n]) == phrase and not taken & set(range(i, i + n)):
                taken |= set(range(i, i + n))
                out.append((i, n, cls))
    return sorted(out)


def _reference(clause: str, clauses: list, vocab: dict, noun_class: str) -> str:
    """The shortest description of `clause` that no other clause of the caption fits: its noun, then the noun
    with one, two, ... of its attributes (words of the classes whose values are all single words: colour and
    size, not position), else the whole clause ("circle", "red circle", "red circle at the top")."""
    words = _article(clause).split()
    nouns = [w for w in words if w in vocab.get(noun_class, ())]
    if not nouns:
        return _article(clause)
    single = [c for c in vocab if c != noun_class and all(" " not in v for v in vocab[c])]
    attrs = [w for w in words if w != nouns[-1] and any(w in vocab[c] for c in single)]
    others = [set(_article(c).split()) for c in clauses if c != clause]
    for k in range(len(attrs) + 1):
        for chosen in combinations(attrs, k):
            if not any(set(chosen) | {nouns[-1]} <= o for o in others):
                return " ".join([w for w in words if w in chosen] + [nouns[-1]])
    return _article(clause)


def _edit(rule: str, caption: str, other: str, vocab: dict, rng, noun_class: str = "shape") -> tuple | None:
    """(edited caption, template list name, template fields) or None when the rule does not apply."""
    clauses = _clauses(caption)
    if rule == "swap":
        spots = [(c, spot) for c, clause in enumerate(clauses) for spot in _spots(clause.split(), vocab)]
        if not spots:
            return None
        c, (i, n, cls) = spots[int(rng.integers(len(spots)))]
        words = clauses[c].split()
        old = " ".join(words[i:i + n])
        choices = [v for v in vocab[cls] if v != old]
        if not choices:
            return None
        word = choices[int(rng.integers(len(choices)))]
        new = " ".join(words[:i] + [word] + words[i + n:])
        edited = clauses[:c] + [new] + clauses[c + 1:]
        fields = {"old": _article(clauses[c]), "new": _article(new), "old_word": old, "new_word": word,
                  "ref": _reference(clauses[c], clauses, vocab, noun_class)}
        if word in SIZE_WORDS:
            fields["size_verb"], fields["size_way"] = SIZE_WORDS[word]
        name = f"swap_{cls}" if f"swap_{cls}" in TEMPLATES else "swap"
        return _join(edited), name, fields
    if rule == "remove":
        if len(clauses) < 2:
            return None
        k = int(rng.integers(len(clauses)))
        fields = {"clause": _article(clauses[k]), "ref": _reference(clauses[k], clauses, vocab, noun_class)}
        return _join(clauses[:k] + clauses[k + 1:]), "remove", fields
    extra = _clauses(other)
    clause = extra[int(rng.integers(len(extra)))]
    if clause in clauses:
        return None
    return _join(clauses + [clause]), "add", {"clause": clause}


def synthesize_triplets(captions: dict, n: int, vocab: dict, seed: int = 0, min_match: float = 0.8,
                        rules: tuple = RULES, rewrite=None, max_draws: int | None = None,
                        noun_class: str = "shape", also_within: float = 0.05, max_also: int = 64) -> Synthesis:
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
        edited = _edit(rule, captions[ref], captions[names[int(rng.integers(len(names)))]], vocab, rng, noun_class)
        if edited is None:
            continue
        text_caption, name, fields = edited
        f1 = index.f1(text_caption)
        f1[position[ref]] = -1.0
        best = np.flatnonzero(f1 == f1.max())
        pick = int(best[int(rng.integers(len(best)))])
        target = names[pick]
        if f1.max() < min_match or captions[target] == captions[ref]:
            continue
        close = np.flatnonzero(f1 >= f1.max() - also_within)
        close = close[np.argsort(-f1[close], kind="stable")]
        also = tuple(names[i] for i in close[:max_also + 1] if i != pick)[:max_also]
        templates = [t for t in TEMPLATES[name] if all(f in fields for f in _FIELDS.findall(t))]
        text = templates[int(rng.integers(len(templates)))].format(**fields)
        if rewrite is not None:
            text = rewrite(text)
        out.append(Query(f"syn-{len(out)}", ref, text, (target,) + also))
        scores.append(round(float(f1.max()), 4))
        counts[rule] += 1
    return Synthesis(out, scores, counts, drawn)
