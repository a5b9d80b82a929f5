"""The real CLIP BPE vocabulary, read from the `openai-clip` package's `bpe_simple_vocab_16e6.txt.gz`.

The file lists BPE merges (first line a header). The CLIP vocabulary is the 256 byte symbols, the same with the
end-of-word marker `</w>`, one entry per merge (the first 48,894 merges), then `<|startoftext|>` and
`<|endoftext|>`: 49,408 entries. We build a `transformers` CLIPTokenizer from them, so a tiny model saves the same
tokenizer files a real CLIP checkpoint carries and loads them back with `AutoTokenizer.from_pretrained`.
"""
from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path

from cirlab.errors import CirlabError

VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 256 * 2 - 2


def byte_symbols() -> list:
    """The stand-in characters of byte-level BPE (GPT-2 / CLIP convention), in vocabulary order.

    Printable bytes stand for themselves and come first; the other bytes map to chr(256 + k) and follow.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    others = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + k) for k in range(len(others))]


def bpe_file() -> Path:
    """Locate the vocabulary inside the installed `openai-clip` package without importing it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise CirlabError("the CLIP BPE vocabulary needs the PyPI package openai-clip (pip install openai-clip)")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.exists():
        raise CirlabError(f"CLIP BPE vocabulary not found at {path}")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple:
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:1 + N_MERGES]]
    symbols = byte_symbols()
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


def clip_tokenizer(model_max_length: int = 77):
    """A transformers CLIPTokenizer over the real CLIP vocabulary."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
