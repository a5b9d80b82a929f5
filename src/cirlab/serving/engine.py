"""The search engine: a checkpoint's model over a persistent ImageIndex (no HTTP here).

`build_index` embeds every image under a folder (recursively) with the checkpoint's `encode_target` and writes an
index; `Engine` opens one, reloads the model its manifest names (refusing a checkpoint that changed since, by its
identity), and searches it with `encode_query` (an image file, PIL image or indexed id, plus a text), adds and
removes items. Only the CIRModel interface is used.

Item ids come from the path under the image folder without its extension, "/" written as "__"
("shoes/red.jpg" -> "shoes__red"). Methods whose targets read captions (csmcir's symmetric tower) take them from a
caption cache (`captions`: the JSONL `cirlab caption` writes, matched by id or file stem) or, for images it lacks,
from a captioner backend (`captioner`, as in `cirlab caption`); without either, building refuses with the first
image that has no caption.
"""
from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cirlab.data.images import open_image
from cirlab.data.split import read_caption_records
from cirlab.errors import CirlabError
from cirlab.index import ImageIndex, check_id, check_settings
from cirlab.types import Reference, SearchHit

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def scan_images(folder) -> list:
    """(id, path) of every image file under `folder`, sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CirlabError(f"image folder not found: {folder}")
    found: dict = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            item_id = str(p.relative_to(folder).with_suffix("")).replace("/", "__")
            if item_id in found:
                raise CirlabError(f"{found[item_id]} and {p} map to the same id {item_id!r}; rename one")
            found[check_id(item_id)] = str(p.resolve())
    if not found:
        raise CirlabError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return sorted(found.items())


def read_metadata(path, items: list) -> list:
    """Each (id, path) item's metadata from a sidecar JSONL file whose lines are JSON objects naming an item by
    "id" or by "path" (the file's path as given, or its name); the other keys are the metadata. Items it does not
    name get {}."""
    from cirlab.jsonl import json_lines

    by_id, by_path = {}, {}
    for n, row in json_lines(path, "metadata"):
        if ("id" in row) == ("path" in row):
            raise CirlabError(f"{path}: line {n} must be a JSON object with exactly one of \"id\" and \"path\"")
        meta = {k: v for k, v in row.items() if k not in ("id", "path")}
        (by_id if "id" in row else by_path)[str(row.get("id", row.get("path")))] = meta
    return [by_id.get(i, by_path.get(p, by_path.get(Path(p).name, {}))) for i, p in items]


def read_captions(path, level: str = "final_caption") -> dict:
    """image -> caption at `level` from a caption cache (the newest record of each image)."""
    return {image: rec["final_caption"] if level == "final_caption" else rec.get("levels", {}).get(level, "")
            for image, rec in read_caption_records(path).items()}


def _captions_for(model, items: list, captions=None, captioner=None, work: Path | None = None,
                  progress: bool = True, **engine) -> list:
    """Each item's caption at the model's `caption_level` (what its targets or its queries read), from the cache
    `captions` or else the `captioner` (its answers kept in WORK/captions.jsonl; `engine` holds caption_images'
    engine options, Ray's included); "" for every item of a method that reads none."""
    level = model.caption_level
    if not level:  # a method that reads none keeps the cache's captions it is given (for a re-ranker that does)
        known = read_captions(captions) if captions else {}
        return [known.get(i, known.get(Path(p).stem, "")) for i, p in items]
    known = read_captions(captions, level) if captions else {}

    def lookup(item_id: str, path: str):
        return known.get(item_id, known.get(Path(path).stem))
    missing = [(i, p) for i, p in items if lookup(i, p) is None]
    if missing and captioner is not None:
        from cirlab.captioning.cache import CaptionCache
        from cirlab.captioning.run import caption_images

        cache = CaptionCache((work or Path(".")) / "captions.jsonl")
        caption_images(missing, captioner, cache, progress=progress, **engine)
        known |= read_captions(cache.path, level)
        missing = [(i, p) for i, p in items if lookup(i, p) is None]
    if missing:
        raise CirlabError(f"method {model.name} needs a caption of every image; {len(missing)} have none "
                          f"(first: {missing[0][1]}); pass a caption cache (--captions) or a captioner")
    return [lookup(i, p) for i, p in items]


class _Embedder:
    """encode_target of one batch of (position, path, caption) items: (K, D) float32 arrays."""

    def __init__(self, model):
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, chunk: list) -> list:
        m = self.model
        pixels = m.prepare([open_image(p) for _, p, _ in chunk])
        feats = m.encode_target(pixels, [c for _, _, c in chunk] if m.target_captions else None)
        feats = feats.float().cpu()
        return list((feats if feats.dim() == 3 else feats[:, None, :]).numpy())


def _embedder(checkpoint: str):
    import cirlab

    return _Embedder(cirlab.load(checkpoint))


def embed_images(model, paths: list, captions: list | None = None, batch_size: int = 64, progress: bool = True,
                 engine: str = "local", checkpoint=None, address: str | None = None,
                 concurrency: int = 1) -> np.ndarray:
    """encode_target of image files, (N, K, D) float32; images are decoded batch by batch, never all at once.
    With `engine="ray"` each of `concurrency` Ray actors loads `checkpoint` and embeds its batches."""
    from functools import partial

    from cirlab.batches import run_batches

    items = list(zip(range(len(paths)), paths, captions or [""] * len(paths)))  # positions: results come unordered
    factory = partial(_embedder, str(checkpoint)) if engine == "ray" else partial(_Embedder, model)
    out = [None] * len(items)
    bar = tqdm(total=len(items), desc="embed images", disable=not progress, mininterval=1.0, unit="img")
    for chunk, vectors in run_batches(items, factory, batch_size, engine, address, concurrency):
        for (n, _, _), v in zip(chunk, vectors):
            out[n] = v
        bar.update(len(chunk))
    bar.close()
    return np.stack(out).astype(np.float32) if out else np.zeros((0, 1, 1), np.float32)


def build_index(checkpoint, images, out, backend: str = "exact", params: dict | None = None, captions=None,
                captioner=None, batch_size: int = 64, progress: bool = True, engine: str = "local",
                address: str | None = None, concurrency: int = 1, limit: int | None = None,
                captioner_factory=None, metadata=None) -> ImageIndex:
    """Embed every image under `images` (the first `limit` by id, if given) with the checkpoint's target encoder
    into a new index at `out` (in this process, or with `engine="ray"` in a pool of `concurrency` Ray actors).
    Images the caption cache lacks are captioned by `captioner`; with the ray engine and `captioner_factory` (a
    picklable function that builds the captioner), in the actors too. `metadata`, a sidecar JSONL file
    (`read_metadata`), gives items the metadata that search filters read."""
    import cirlab
    from cirlab.methods import checkpoint_identity

    check_settings(backend, params)  # before a single image is embedded
    items = scan_images(images)[:limit]
    metas = read_metadata(metadata, items) if metadata else None
    model = cirlab.load(checkpoint)
    ray = {"engine": "ray", "backend_factory": captioner_factory, "address": address, "concurrency": concurrency} \
        if engine == "ray" and captioner_factory is not None else {}
    texts = _captions_for(model, items, captions, captioner, Path(out), progress, **ray)
    vectors = embed_images(model, [p for _, p in items], texts, batch_size, progress, engine, checkpoint, address,
                           concurrency)
    return ImageIndex.create(out, checkpoint=str(Path(checkpoint).resolve()),
                             checkpoint_id=checkpoint_identity(checkpoint), method=model.name, backend=backend,
                             params=params, ids=[i for i, _ in items], paths=[p for _, p in items], captions=texts,
                             vectors=vectors, metas=metas)


class TooLarge(CirlabError):
    """An image over the pixel limit."""


class NotAnImage(CirlabError):
    """Bytes that do not decode to a whole image."""


MAX_ASPECT = 32  # the longer side at most this many times the shorter: preprocessing scales the short side up


def decode_upload(data: bytes, max_pixels: int, max_aspect: float = MAX_ASPECT) -> Image.Image:
    """An uploaded image, fully decoded. Empty, non-image or truncated bytes raise NotAnImage; an image over
    `max_pixels`, or whose sides differ more than `max_aspect` times (a 1 x 200,000 strip, which resizing to a square
    crop would blow up to gigabytes), raises TooLarge, checked from its header before any pixel is decoded."""
    if not data:
        raise NotAnImage("the uploaded image is empty")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise TooLarge(f"the image has {img.width}x{img.height} pixels, over the limit of {max_pixels:,}")
        if max(img.width, img.height) > max_aspect * max(1, min(img.width, img.height)):
            raise TooLarge(f"the image is {img.width}x{img.height} pixels: one side is more than {max_aspect:g} "
                           "times the other")
        img.load()
    except Image.DecompressionBombError as e:
        raise TooLarge(f"the image is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        detail = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the upload", str(e))  # no Python object reprs
        raise NotAnImage(f"the upload is not a readable image ({type(e).__name__}: {detail})") from None
    return img


class Engine:
    """An index with the model that built it."""

    def __init__(self, index_dir, device: str = "cpu", captioner=None, rerank=None, rerank_k: int = 50):
        import cirlab
        from cirlab.methods import checkpoint_identity

        self.index = ImageIndex(index_dir)
        m = self.index.manifest
        checkpoint = Path(m["checkpoint"])
        if not (checkpoint / "cirlab.json").exists():
            raise CirlabError(f"the index's checkpoint {checkpoint} is gone; rebuild the index")
        if checkpoint_identity(checkpoint) != m["checkpoint_id"]:
            raise CirlabError(f"the checkpoint {checkpoint} changed since the index was built; rebuild the index")
        self.model = cirlab.load(checkpoint, device=device).eval()
        self.captioner = captioner  # describes uploaded references for a method whose queries read descriptions
        self.rerank = cirlab.load(rerank, device=device).eval() if rerank else None  # a second-stage model
        if rerank_k < 1:
            raise CirlabError(f"rerank_k must be at least 1, got {rerank_k}")
        self.rerank_k = rerank_k
        self._hashes = (None, {})  # (index generation, file sha1 -> id): see indexed_copy

    @torch.no_grad()
    def query_vector(self, image, text: str, model=None) -> np.ndarray:
        """The composed query (D,) of an image (PIL image, or an indexed id) and a text, by the index's model (or
        `model`, the re-ranker)."""
        model = model or self.model
        reference = None
        if isinstance(image, str):
            try:
                item = self.index.item(image)
            except KeyError:
                raise CirlabError(f"unknown image id {image!r}") from None
            reference, image = Reference(image, item.get("caption", "")), open_image(item["path"])
        extra = {}
        if model.query_captions:
            if reference is None:
                reference = Reference("", self.describe(image))
            if not reference.caption:
                raise CirlabError(f"image {reference.image!r} has no caption in the index, and method "
                                  f"{model.name} reads a description of the reference; rebuild the index with "
                                  "captions")
            extra["references"] = [reference]
        pixels = model.prepare([image])
        return model.encode_query(pixels, [text], **extra).float().cpu().numpy()[0]

    def describe(self, image) -> str:
        """The captioner's description (the caption level the model reads) of an image that is not indexed."""
        import tempfile

        from cirlab.captioning.run import describe_images

        if self.captioner is None:
            raise CirlabError(f"method {self.model.name} reads a description of the reference image: an image that "
                              "is not indexed needs a captioner (--captioner), or search by an indexed id")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "reference.png"
            image.convert("RGB").save(path)
            return describe_images([("reference", str(path))], self.captioner, self.model.query_captions)[0]

    def indexed_copy(self, data: bytes) -> str | None:
        """The id of an indexed image whose file has exactly these bytes, else None (the files are hashed once per
        index generation, at the first call)."""
        snap = self.index.snapshot  # the newest state (it may bring a newer manifest)
        generation = self.index.manifest["generation"]
        if self._hashes[0] != generation:
            by_hash = {}
            for item_id, path in zip(snap.ids, snap.paths):
                try:
                    by_hash.setdefault(hashlib.sha1(Path(path).read_bytes()).hexdigest(), item_id)
                except OSError:
                    continue
            self._hashes = (generation, by_hash)
        return self._hashes[1].get(hashlib.sha1(data).hexdigest())

    def feedback_vector(self, query: np.ndarray, more: list = (), less: list = (), alpha: float = 0.5,
                        beta: float = 0.25) -> np.ndarray:
        """Rocchio's move of a query (D,) toward items liked and away from items disliked: q + alpha * mean(more)
        - beta * mean(less), each a list of ids or (id, weight) pairs (weighted means), renormalised. An item with
        several token vectors (a multi-token target) counts as the normalised mean of its tokens, the single vector
        closest in the least-squares sense to the whole set."""
        def centre(items) -> np.ndarray | None:
            pairs = [(i, 1.0) if isinstance(i, str) else (str(i[0]), float(i[1])) for i in items]
            if not pairs:
                return None
            snap = self.index.snapshot
            vecs = []
            for item_id, w in pairs:
                if item_id not in snap.position:
                    raise CirlabError(f"unknown image id {item_id!r} in the feedback")
                v = np.asarray(snap.vectors[snap.position[item_id]], np.float32).reshape(-1, query.shape[0]).mean(0)
                vecs.append(w * v / max(float(np.linalg.norm(v)), 1e-12))
            return np.sum(vecs, 0) / max(sum(w for _, w in pairs), 1e-12)
        q = np.asarray(query, np.float32).copy()
        up, down = centre(more), centre(less)
        if up is not None:
            q += alpha * up
        if down is not None:
            q -= beta * down
        return q / max(float(np.linalg.norm(q)), 1e-12)

    def search(self, image, text: str, k: int = 10, exclude: str | None = None, filter: dict | None = None,
               more: list = (), less: list = ()) -> list:
        """Up to k SearchHits; an indexed reference (an id) is left out of its own results, as is `exclude` (an
        upload that is a copy of an indexed image). With a re-ranker, the first `rerank_k` results are rescored
        by it (their scores are then the re-ranker's) and come first. `filter`: only items whose metadata passes
        it (index/filters.py). `more` and `less`: feedback, items liked and disliked (`feedback_vector`), which
        are left out of the results as the reference is."""
        if isinstance(image, str):
            exclude = image
        shown = {exclude} | {i if isinstance(i, str) else str(i[0]) for i in (*more, *less)}
        shown.discard(None)
        depth = max(k, self.rerank_k) if self.rerank is not None else k
        query = self.query_vector(image, text)
        if more or less:
            query = self.feedback_vector(query, more, less)
        hits = self.index.search(query[None], depth + len(shown), filter)[0]
        hits = [h for h in hits if h.id not in shown][:depth]
        if self.rerank is not None:
            hits = self._rerank(image, text, hits[:self.rerank_k]) + hits[self.rerank_k:]
        return hits[:k]

    @torch.no_grad()
    def _rerank(self, image, text: str, hits: list) -> list:
        """The hits rescored by the re-ranker: its query against its own features of each hit's image (and caption,
        where it reads one), computed now, so the index needs no second set of vectors."""
        m = self.rerank
        q = torch.from_numpy(self.query_vector(image, text, model=m))[None]
        items = [self.index.item(h.id) for h in hits]
        captions = [it.get("caption", "") for it in items]
        if m.target_captions and not all(captions):
            raise CirlabError(f"the re-ranker {m.name} reads target captions and this index stores none; build it "
                              "with captions (--captions or --captioner)")
        t = m.encode_target(m.prepare([open_image(it["path"]) for it in items]),
                            captions if m.target_captions else None).float().cpu()
        scores = m.similarity(q, t)[0].tolist()
        order = sorted(range(len(hits)), key=lambda i: -scores[i])
        return [SearchHit(hits[i].id, float(scores[i])) for i in order]

    def add(self, items: list, captions=None, captioner=None, replace: bool = False, progress: bool = False,
            metas: list | None = None) -> None:
        """Index (id, path) items, with their metadata when given; target captions, where the method reads them,
        come from the caption cache `captions` or the `captioner`, as in `build_index`."""
        for item_id, _ in items:
            check_id(item_id)
        texts = _captions_for(self.model, items, captions, captioner, self.index.folder, progress)
        vectors = embed_images(self.model, [p for _, p in items], texts, progress=progress)
        self.index.add([i for i, _ in items], [p for _, p in items], vectors, texts, replace=replace, metas=metas)

