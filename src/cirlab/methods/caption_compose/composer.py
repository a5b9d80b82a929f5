"""The composer of the caption-and-compose method: (a description of the reference, a modification text) -> a
description of the target, from an LLM or the synthetic world's oracle, every answer cached.

Backends:
- `oracle`: the synthetic world (CIRR layout) knows each query's scene-graph edit; the composer applies it to the
  reference's scene and writes the result as the world's oracle caption. `imperfection` is the oracle editor's
  (cirlab.editing.oracle): the probability that each attribute the text does not mention is changed before the
  edit is applied, so at 0 the description is the true target's caption. It finds a query by its (reference,
  text) among the world's annotation files; a pair it does not know is counted as failed.
- `hf`: a transformers causal LM with a chat template (AutoModelForCausalLM), by Hugging Face id or folder.
- `openai`: an OpenAI-compatible chat-completions endpoint (the captioning backend's client, text only).

Several descriptions per query (`samples`) come from sampling at `temperature` (the oracle draws its imperfection
anew per sample). The prompt is cirlab's (the training-free papers each write their own), versioned by
COMPOSE_VERSION and hashed into each record. Every answer goes to a JSONL cache keyed by (model, prompt hash,
reference description, text, sample), appended and synced per batch, so a rerun asks nothing it has asked
before. An answer with no usable sentence is counted as failed and not cached (the next run asks again); the
query then falls back to the reference description followed by the text.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from cirlab.errors import CirlabError
from cirlab.jsonl import JsonlRecords

COMPOSE_VERSION = "compose-v1"
INSTRUCTION = (
    "You are given the description of a reference image and a request to change it. Write the description of the "
    "image that results from applying the change to the reference image: keep everything the request does not "
    "change, and describe the changed parts precisely.\n"
    "Reference image: {description}\n"
    "Change: {text}\n"
    "Answer with only the new description, one sentence."
)
MAX_ANSWER = 400  # characters kept of an answer


def prompt_hash() -> str:
    return hashlib.sha1((COMPOSE_VERSION + INSTRUCTION).encode()).hexdigest()[:12]


def compose_messages(description: str, text: str) -> list:
    """Chat messages (OpenAI / transformers format, text only) asking for the target's description."""
    prompt = INSTRUCTION.format(description=description.strip(), text=text.strip())
    return [{"role": "user", "content": [{"type": "text", "text": prompt}]}]


def parse_description(answer: str) -> str:
    """The target description in an answer: its first non-empty line, without a label ("Description:"), list
    marks or quotes; "" when nothing is left."""
    for line in (answer or "").splitlines():
        line = re.sub(r"^\s*(?:[-*>]|\d+[.)])?\s*(?:(?:new |target )?(?:description|image|answer)\s*:)?", "",
                      line, flags=re.IGNORECASE).strip().strip('"\'`').strip()
        if re.search(r"[A-Za-z]", line):
            return line[:MAX_ANSWER]
    return ""


@dataclass(frozen=True)
class ComposeItem:
    reference: str  # the reference image's id ("" for an upload)
    description: str  # its description
    text: str  # the modification text


@dataclass
class ComposeStats:
    asked: int = 0  # (query, sample) pairs asked for
    cached: int = 0  # found in the cache
    composed: int = 0  # answered and cached
    failed: int = 0  # no usable description; fell back to "description text"
    requests: int = 0  # calls made to the backend (a batch of the hf or oracle backend counts once per item)


class ComposeCache(JsonlRecords):
    """The answers' JSONL file; with no path, a cache in memory only (a model built in Python, not loaded)."""
    what = "compose record"

    def __init__(self, path=None):
        if path is None:
            self.path, self.records = None, {}
        else:
            super().__init__(path)

    def append(self, records: list) -> None:
        if self.path is None:
            self.records |= {self.key(r): r for r in records}
        else:
            super().append(records)

    def key(self, record: dict):
        return (record["model"], record["prompt_hash"], record["description"], record["text"], record["sample"])


class OracleComposer:
    """The synthetic world's edits written as captions (see the module docstring)."""

    def __init__(self, data_root, imperfection: float = 0.0, seed: int = 0):
        from cirlab.data.split import load_json

        root = Path(data_root)
        if not (root / "synth" / "scenes.json").exists():
            raise CirlabError(f"the oracle composer needs the synthetic world's scene graphs: "
                              f"{root / 'synth' / 'scenes.json'} not found (config field oracle_root)")
        if not 0.0 <= imperfection <= 1.0:
            raise CirlabError(f"imperfection must be in [0, 1], got {imperfection}")
        self.root, self.imperfection, self.seed = root, imperfection, seed
        self.queries = {}  # (reference, text) -> (split, pairid)
        for path in sorted((root / "captions").glob("cap.rc2.*.json")):
            split = path.name[len("cap.rc2."):-len(".json")]
            if (root / "synth" / f"edits.{split}.json").exists():
                for row in load_json(path):
                    self.queries[(row["reference"], row["caption"])] = (split, str(row["pairid"]))
        self.editors: dict = {}
        self.model_id = f"cirlab-oracle/imperfection={imperfection:g}"

    def _editor(self, split: str):
        from cirlab.editing.oracle import OracleEditor

        if split not in self.editors:
            self.editors[split] = OracleEditor(self.root, split, self.imperfection, self.seed)
        return self.editors[split]

    def compose(self, items: list, samples: list) -> list:
        from cirlab.data.synth.world import oracle_captions

        out = []
        for item, sample in zip(items, samples):
            found = self.queries.get((item.reference, item.text))
            if found is None:
                out.append("")  # not a query of this world: counted as failed
                continue
            split, key = found
            scene, _, _ = self._editor(split).pseudo_target(key, item.reference, sample, train_only=False)
            out.append(oracle_captions(scene)["final_caption"])
        return out


class HFComposer:
    """A transformers causal LM; greedy when one sample is asked for, else sampling at `temperature`."""

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 96, temperature: float = 0.7):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from cirlab.backbones.base import NO_HUB_KERNELS

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model, **NO_HUB_KERNELS).to(device).eval()
        except (OSError, ValueError) as e:
            raise CirlabError(f"cannot load causal LM {model!r}: {e}") from None
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model_id = Path(model).name if Path(model).exists() else model
        self.device, self.max_new_tokens, self.temperature = device, max_new_tokens, temperature
        self._torch = torch

    def compose(self, items: list, samples: list) -> list:
        texts = [self.tokenizer.apply_chat_template(compose_messages(i.description, i.text),
                                                    add_generation_prompt=True, tokenize=False) for i in items]
        enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False).to(self.device)
        sample = any(s > 0 for s in samples)
        kwargs = {"do_sample": True, "temperature": self.temperature} if sample else {"do_sample": False}
        if sample:
            self._torch.manual_seed(max(samples))
        with self._torch.no_grad():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id, **kwargs)
        return self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class OpenAIComposer:
    """An OpenAI-compatible endpoint through the captioning client (retries, timeouts, bounded concurrency)."""

    def __init__(self, model: str, base_url: str | None = None, max_tokens: int = 96, temperature: float = 0.7,
                 **client):
        from cirlab.captioning.backends import OpenAIBackend

        self.client = OpenAIBackend(model, base_url, max_tokens=max_tokens, **client)
        self.model_id, self.temperature = model, temperature

    def compose(self, items: list, samples: list) -> list:
        from concurrent.futures import ThreadPoolExecutor

        def one(item, sample):
            temperature = self.temperature if sample > 0 else 0.0
            return self.client.chat(compose_messages(item.description, item.text), temperature, seed=sample)
        with ThreadPoolExecutor(max_workers=self.client.concurrency) as pool:
            return list(pool.map(one, items, samples))


def make_composer(name: str, model: str = "", base_url: str = "", oracle_root: str = "", imperfection: float = 0.0,
                  max_tokens: int = 96, temperature: float = 0.7, device: str = "cpu"):
    if name == "oracle":
        if not oracle_root:
            raise CirlabError("the oracle composer needs the synthetic world's data root (config field oracle_root)")
        return OracleComposer(oracle_root, imperfection)
    if name in ("hf", "openai") and not model:
        raise CirlabError(f"the {name} composer needs a model (config field composer_model: a Hugging Face id or "
                          "folder for hf, the served model name for openai)")
    if name == "hf":
        return HFComposer(model, device, max_tokens, temperature)
    if name == "openai":
        return OpenAIComposer(model, base_url or None, max_tokens, temperature)
    raise CirlabError(f"unknown composer {name!r}: oracle, hf or openai")


def _record(backend, item: ComposeItem, sample: int, answer: str, description: str) -> dict:
    return {"model": backend.model_id, "prompt_version": COMPOSE_VERSION, "prompt_hash": prompt_hash(),
            "reference": item.reference, "description": item.description, "text": item.text, "sample": sample,
            "answer": (answer or "")[:2000], "target": description}


def compose(items: list, backend, cache: ComposeCache, samples: int = 1, batch_size: int = 16,
            stats: ComposeStats | None = None) -> list:
    """Target descriptions of each item: a list of `samples` strings per item, from the cache or the backend (the
    new answers appended to the cache batch by batch). A failed answer gives "description text" in its place."""
    stats = stats if stats is not None else ComposeStats()
    pid = prompt_hash()
    keys = [(backend.model_id, pid, it.description, it.text, s) for it in items for s in range(samples)]
    pairs = [(it, s) for it in items for s in range(samples)]
    stats.asked += len(keys)
    first: dict = {}  # key -> its first position (one question per distinct key)
    for n, k in enumerate(keys):
        first.setdefault(k, n)
    todo = [n for k, n in first.items() if k not in cache]
    stats.cached += sum(1 for k in keys if k in cache)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo:lo + batch_size]
        answers = backend.compose([pairs[n][0] for n in chunk], [pairs[n][1] for n in chunk])
        stats.requests += len(chunk)
        records = []
        for n, answer in zip(chunk, answers):
            target = parse_description(answer)
            if target:
                records.append(_record(backend, *pairs[n], answer, target))
            else:
                stats.failed += 1
        stats.composed += len(records)
        cache.append(records)
    out = []
    for n, (it, _) in enumerate(pairs):
        rec = cache.records.get(keys[n])
        out.append(rec["target"] if rec else f"{it.description.strip()} {it.text.strip()}".strip())
    return [out[i * samples:(i + 1) * samples] for i in range(len(items))]
