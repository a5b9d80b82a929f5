"""Caption every gallery image of a split into the cache: batched, resumable, with repair and fallback.

An answer that does not parse is sent back once with a repair prompt; if the repaired answer does not parse
either, the record falls back to the finest level that could be read (counted as a fallback); an answer with no
usable level at all is counted as a failure and not cached, so the next run asks again.
"""
from __future__ import annotations

from dataclasses import dataclass

from tqdm import tqdm

from cirlab.captioning.cache import CaptionCache
from cirlab.captioning.prompt import (LEVELS, PROMPT_VERSION, MalformedAnswer, fallback_levels, messages,
                                      parse_answer, prompt_hash)
from cirlab.data.readers import read_split


@dataclass
class CaptionStats:
    images: int = 0
    cached: int = 0  # already in the cache before this run
    captioned: int = 0
    repaired: int = 0  # parsed after the repair prompt
    fallbacks: int = 0  # completed from a partial answer
    failures: int = 0  # nothing usable; not cached


def _record(image: str, levels: dict, model_id: str, fallback: bool) -> dict:
    return {"image": image, "levels": {k: levels.get(k, "") for k in LEVELS}, "final_caption": levels["final_caption"],
            "model": model_id, "prompt_version": PROMPT_VERSION, "prompt_hash": prompt_hash(), "fallback": fallback}


def caption_images(items: list, backend, cache: CaptionCache, batch_size: int = 16, progress: bool = True,
                   stats: CaptionStats | None = None) -> CaptionStats:
    """Caption (name, path) items missing from the cache."""
    stats = stats or CaptionStats()
    todo = [(n, p) for n, p in items if (n, PROMPT_VERSION) not in cache]
    stats.images += len(items)
    stats.cached += len(items) - len(todo)
    bar = tqdm(total=len(todo), desc="caption", disable=not progress, mininterval=1.0)
    for lo in range(0, len(todo), batch_size):
        chunk = todo[lo:lo + batch_size]
        answers = backend.generate([p for _, p in chunk], [messages() for _ in chunk])
        parsed, retry = {}, []
        for (name, path), text in zip(chunk, answers):
            try:
                parsed[name] = (parse_answer(text), False)
            except MalformedAnswer:
                retry.append((name, path, text))
        if retry:
            again = backend.generate([p for _, p, _ in retry], [messages(repair_of=t) for _, _, t in retry])
            for (name, _, _), text in zip(retry, again):
                try:
                    parsed[name] = (parse_answer(text), False)
                    stats.repaired += 1
                except MalformedAnswer as e:
                    levels = fallback_levels(e.levels)
                    if levels is None:
                        stats.failures += 1
                    else:
                        parsed[name] = (levels, True)
                        stats.fallbacks += 1
        records = [_record(n, parsed[n][0], backend.model_id, parsed[n][1]) for n, _ in chunk if n in parsed]
        cache.append(records)
        stats.captioned += len(records)
        bar.update(len(chunk))
    bar.close()
    return stats


def caption_split(dataset: str, data_root, split: str, backend, out, batch_size: int = 16,
                  progress: bool = True, category: str | None = None) -> CaptionStats:
    data = read_split(dataset, data_root, split, category=category, require_gallery=True)
    return caption_images(sorted(data.gallery.items()), backend, CaptionCache(out), batch_size, progress)
