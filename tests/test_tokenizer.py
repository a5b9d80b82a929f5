"""The CLIP tokenizer is the real CLIP BPE vocabulary: same ids as OpenAI's reference tokenizer."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from cirlab.backbones.tokenizer import VOCAB_SIZE, bpe_file, clip_tokenizer


def _reference_tokenizer():
    """OpenAI's simple_tokenizer.py, loaded by file path as a test oracle (the package itself is not imported)."""
    path = Path(bpe_file()).parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("clip_reference_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_file()))


TEXTS = ["make the small red circle blue", "Add a LARGE cyan star at the top-left!", "it's 2x bigger; don't",
         "café naïve résumé 123 #hashtag <tag>", "the   spaced\ttext", "a"]


def test_ids_match_openai_reference():
    ours, ref = clip_tokenizer(77), _reference_tokenizer()
    assert len(ours) == VOCAB_SIZE
    for text in TEXTS:
        ids = ours(text)["input_ids"]
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids[1:-1] == ref.encode(text), text


def test_saved_tokenizer_loads_back(tmp_path):
    from transformers import AutoTokenizer

    tok = clip_tokenizer(40)
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.model_max_length == 40
