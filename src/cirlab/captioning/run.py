"""Caption every gallery image of a split into the cache: batched, resumable, with repair and fallback.

An answer that does not parse is sent back once with a repair prompt; if the repaired answer does not parse
either, the record falls back to the finest level that could be read, from the repaired answer or else from the
first (counted as a fallback); an image with no usable level in either is counted as a failure and not cached, so
the next run asks again.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

from tqdm import tqdm

from cirlab.captioning.cache import CaptionCache
from cirlab.captioning.prompt import (LEVELS, PROMPT_VERSION, MalformedAnswer, fallback_levels, messages,
                                      parse_answer, prompt_hash)
from cirlab.data.readers import read_split
from cirlab.errors import CirlabError


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


class _Captioner:
    """Captions one batch: generate, parse, one repair prompt for malformed answers, then the partial fallback."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, chunk: list) -> list:
        answers = self.backend.generate([p for _, p in chunk], [messages() for _ in chunk])
        out, retry = [], []
        for n, ((name, path), text) in enumerate(zip(chunk, answers)):
            try:
                out.append({"levels": parse_answer(text), "fallback": False, "repaired": False})
            except MalformedAnswer as e:
                out.append(None)
                retry.append((n, path, text, e.levels))
        if retry:
            again = self.backend.generate([r[1] for r in retry], [messages(repair_of=r[2]) for r in retry])
            for (n, _, _, first), text in zip(retry, again):
                try:
                    out[n] = {"levels": parse_answer(text), "fallback": False, "repaired": True}
                except MalformedAnswer as e:  # the repair's usable levels, else the first answer's
                    levels = fallback_levels(e.levels) or fallback_levels(first)
                    out[n] = {"levels": levels, "fallback": True, "repaired": False} if levels else \
                        {"levels": None, "fallback": False, "repaired": False}
        model_id = self.backend.model_id
        return [r | {"model": model_id} for r in out]


def describe_images(items: list, backend, level: str = "final_caption") -> list:
    """Captions at `level` of (name, path) items, not cached (a query's uploaded reference); an image with no
    usable answer raises CirlabError."""
    out = []
    for (name, _), r in zip(items, _Captioner(backend)(items)):
        if r["levels"] is None:
            raise CirlabError(f"the captioner gave no usable description of {name}")
        out.append(r["levels"][level] if level in r["levels"] else r["levels"]["final_caption"])
    return out


def _captioner(backend_factory):
    return _Captioner(backend_factory())


def caption_images(items: list, backend, cache: CaptionCache, batch_size: int = 16, progress: bool = True,
                   stats: CaptionStats | None = None, engine: str = "local", backend_factory=None,
                   address: str | None = None, concurrency: int = 1) -> CaptionStats:
    """Caption (name, path) items missing from the cache. With `engine="ray"`, `backend_factory` (picklable,
    for example a functools.partial of `make_backend`) builds the captioner inside each of `concurrency` Ray
    actors; the cache is written here either way, by one run at a time (a second stops with an error)."""
    from cirlab.batches import run_batches

    stats = stats or CaptionStats()
    with cache.writing():  # one run appends to a cache at a time
        cache.reload()  # what a run that held the lock before this one wrote
        todo = [(n, p) for n, p in items if (n, PROMPT_VERSION) not in cache]
        stats.images += len(items)
        stats.cached += len(items) - len(todo)
        if engine == "ray":
            if backend_factory is None:
                raise CirlabError("the ray engine needs a picklable backend_factory to build the captioner in each "
                                  "actor")
            factory = partial(_captioner, backend_factory)
        else:
            factory = partial(_Captioner, backend)
        bar = tqdm(total=len(todo), desc="caption", disable=not progress, mininterval=1.0)
        for chunk, results in run_batches(todo, factory, batch_size, engine, address, concurrency):
            records = []
            for (name, _), r in zip(chunk, results):
                if r["levels"] is None:
                    stats.failures += 1
                    continue
                stats.repaired += r["repaired"]
                stats.fallbacks += r["fallback"]
                records.append(_record(name, r["levels"], r["model"], r["fallback"]))
            cache.append(records)
            stats.captioned += len(records)
            bar.update(len(chunk))
        bar.close()
    return stats


def caption_split(dataset: str, data_root, split: str, backend, out, batch_size: int = 16,
                  progress: bool = True, category: str | None = None, limit: int | None = None,
                  **engine) -> CaptionStats:
    """Caption the split's gallery (the first `limit` images in name order, if given) into the cache `out`;
    `engine` holds caption_images' engine options."""
    data = read_split(dataset, data_root, split, category=category, require_gallery=True)
    items = sorted(data.gallery.items())[:limit]
    return caption_images(items, backend, CaptionCache(out), batch_size, progress, **engine)
