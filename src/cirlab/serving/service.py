"""The search service: the engine behind input checks and write authorisation, with no HTTP in it.

Every bad input raises `ServiceError` with the HTTP status the app answers and a message that names the field:
- 400: neither or both of `image` and `image_id`; empty text, text over `max_text` characters; k out of 1..`max_k`;
  an id that is not a valid item id (path separators, "..", over 128 characters);
- 404: an unknown id; 409: adding an id that exists;
- 400 also for an empty upload; 413: an upload over `max_upload_bytes`, an image over `max_pixels` pixels
  (checked from the header, before decoding: a decompression bomb never reaches memory);
- 415: bytes that are not an image, or a truncated one;
- 401: a write without the right bearer key, compared in constant time; 403: a write when no key is configured;
- 422: adding to an index whose method reads captions, or searching with an uploaded image when the method reads
  a description of the reference (caption_compose), when no captioner is configured.
Uploaded images are written atomically under INDEX/images/ before they are indexed.
"""
from __future__ import annotations

import hmac
from collections import OrderedDict
import time
import uuid
from pathlib import Path

from cirlab.atomic import write_atomic
from cirlab.errors import CirlabError
from cirlab.index import check_id
from cirlab.serving.engine import Engine, NotAnImage, TooLarge, decode_upload

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
MAX_PIXELS = 40_000_000
MAX_TEXT = 512
MAX_K = 100
MAX_SESSIONS = 1000
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "ICO": ".ico"}


class ServiceError(CirlabError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    def __init__(self, index_dir, api_key: str | None = None, max_upload_bytes: int = MAX_UPLOAD_BYTES,
                 max_pixels: int = MAX_PIXELS, captioner=None, engine: Engine | None = None):
        self.engine = engine or Engine(index_dir, captioner=captioner)
        self.index = self.engine.index
        self.api_key = api_key or None  # no key: every write is refused
        self.max_upload_bytes, self.max_pixels, self.captioner = max_upload_bytes, max_pixels, captioner
        self.sessions: OrderedDict = OrderedDict()  # id -> Session, oldest first (at most MAX_SESSIONS)

    # ----------------------------------------------------------------- checks
    def check_id(self, item_id: str) -> str:
        try:
            return check_id(item_id)
        except CirlabError as e:
            raise ServiceError(400, str(e)) from None

    def check_known(self, item_id: str) -> dict:
        self.check_id(item_id)
        try:
            return self.index.item(item_id)
        except KeyError:
            raise ServiceError(404, f"unknown image id {item_id!r}") from None

    def image(self, data: bytes):
        if len(data) > self.max_upload_bytes:
            raise ServiceError(413, f"the upload has {len(data):,} bytes, over the limit of "
                                    f"{self.max_upload_bytes:,}")
        if not data:
            raise ServiceError(400, "the uploaded image is empty")
        try:
            return decode_upload(data, self.max_pixels)
        except TooLarge as e:
            raise ServiceError(413, str(e)) from None
        except NotAnImage as e:
            raise ServiceError(415, str(e)) from None

    def authorise(self, header: str | None) -> None:
        if not self.api_key:
            raise ServiceError(403, "writes are disabled: start the service with CIRLAB_API_KEY set")
        scheme, _, key = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ServiceError(401, "a write needs the header 'Authorization: Bearer <key>' with the right key")

    # ----------------------------------------------------------------- operations
    def search(self, text: str | None, image: bytes | None = None, image_id: str | None = None,
               k: int | str | None = 10, filter: str | dict | None = None, more: str | list | None = None,
               less: str | list | None = None) -> dict:
        t0 = time.perf_counter()
        if (image is None) == (image_id is None):
            raise ServiceError(400, "give exactly one of 'image' (a file) and 'image_id'")
        text = (text or "").strip()
        if not text:
            raise ServiceError(400, "'text' is empty: say what to change")
        if len(text) > MAX_TEXT:
            raise ServiceError(400, f"'text' has {len(text)} characters, over the limit of {MAX_TEXT}")
        k = self._k(k)
        filter = self._json_object(filter, "filter")
        if filter is not None:
            from cirlab.index.filters import check_filter

            try:
                check_filter(filter)
            except CirlabError as e:
                raise ServiceError(400, str(e)) from None
        copy = None
        if image_id is not None:
            self.image_path(image_id)  # 404 for an unknown id or an indexed image whose file is gone
            query = image_id
        else:
            query = self.image(image)
            copy = self.engine.indexed_copy(image)  # an upload of an indexed image is left out of its results
        if image is not None and self.engine.model.query_captions and self.captioner is None:
            raise ServiceError(422, f"method {self.engine.model.name} reads a description of the reference image; "
                                    "this service has no captioner, so search by 'image_id'")
        feedback = {name: self._ids(value, name) for name, value in (("more", more), ("less", less))}
        try:
            hits = self.engine.search(query, text, k, exclude=copy, filter=filter, **feedback)
        except CirlabError as e:  # an indexed image whose file is gone or unreadable, a method's refusal
            raise ServiceError(422, self._safe(e)) from None
        return {"hits": [{"id": h.id, "score": round(h.score, 6), "url": f"/images/{h.id}"} for h in hits],
                "took_ms": round((time.perf_counter() - t0) * 1000, 2)}

    # ----------------------------------------------------------------- sessions (serving/session.py)
    def create_session(self) -> dict:
        from cirlab.serving.session import Session

        sid = uuid.uuid4().hex[:16]
        self.sessions[sid] = Session(self.engine)
        while len(self.sessions) > MAX_SESSIONS:  # the oldest go first
            self.sessions.popitem(last=False)
        return {"id": sid}

    def _session(self, sid: str):
        session = self.sessions.get(sid)
        if session is None:
            raise ServiceError(404, f"unknown session {sid!r} (sessions live in the service's memory; the oldest "
                                    f"are dropped beyond {MAX_SESSIONS})")
        return session

    def session_turn(self, sid: str, text: str | None, image: bytes | None = None, image_id: str | None = None,
                     choose: str | None = None, k: int | str | None = 10, filter: str | dict | None = None,
                     more: str | list | None = None, less: str | list | None = None) -> dict:
        """A turn: from `image` or `image_id`, else from `choose` (one of the last turn's results), else from the
        last turn's chosen or top result."""
        session = self._session(sid)
        if image is not None and image_id is not None:
            raise ServiceError(400, "give at most one of 'image' and 'image_id'")
        text = (text or "").strip()
        if not text or len(text) > MAX_TEXT:
            raise ServiceError(400, f"'text' must be 1 to {MAX_TEXT} characters: say what to change")
        k = self._k(k)
        spec = self._json_object(filter, "filter")
        query = None
        if image is not None:
            query = self.image(image)
        elif image_id is not None:
            self.check_known(image_id)
            query = image_id
        try:
            if choose:
                session.choose(choose)
            turn = session.turn(text, query, k, spec, self._ids(more, "more"), self._ids(less, "less"))
        except CirlabError as e:
            raise ServiceError(400, self._safe(e)) from None
        return {"turn": len(session.turns), "reference": turn.reference,
                "hits": [h | {"url": f"/images/{h['id']}"} for h in turn.hits]}

    def metadata_keys(self, max_values: int = 50) -> dict:
        """Each metadata key of the indexed items with its values (strings, numbers, booleans; up to `max_values`
        a key, sorted), for the page's filters."""
        keys: dict = {}
        for meta in self.index.snapshot.metas:
            for key, value in meta.items():
                if isinstance(value, (str, int, float, bool)):
                    keys.setdefault(key, set()).add(value)
        return {"keys": {k: sorted(v, key=lambda x: (str(type(x)), x))[:max_values] for k, v in sorted(keys.items())}}

    def get_session(self, sid: str) -> dict:
        return {"id": sid} | self._session(sid).to_json()

    def image_path(self, item_id: str) -> Path:
        path = Path(self.check_known(item_id)["path"])
        if not path.is_file():
            raise ServiceError(404, f"the file of image {item_id!r} is missing")
        return path

    def items(self, offset: int = 0, limit: int = 60) -> dict:
        if offset < 0 or not 1 <= limit <= 500:
            raise ServiceError(400, "'offset' must be at least 0 and 'limit' between 1 and 500")
        ids = self.index.ids
        return {"items": [{"id": i, "url": f"/images/{i}"} for i in ids[offset:offset + limit]],
                "total": len(ids)}

    def _safe(self, error: Exception) -> str:
        """An error's message for a client: the server's file paths under the index shown relative to it."""
        return str(error).replace(str(self.index.folder.resolve()) + "/", "").replace(str(self.index.folder) + "/", "")

    @staticmethod
    def _k(k) -> int:
        try:
            k = 10 if k in (None, "") else int(k)
        except (TypeError, ValueError):
            raise ServiceError(400, f"'k' must be an integer, got {str(k)[:20]!r}") from None
        if not 1 <= k <= MAX_K:
            raise ServiceError(400, f"'k' must be between 1 and {MAX_K}, got {k}")
        return k

    def _ids(self, value, field: str) -> list:
        """Feedback ids: a comma-separated string or a list, each a known id."""
        if value in (None, ""):
            return []
        ids = [x.strip() for x in value.split(",") if x.strip()] if isinstance(value, str) else list(value)
        for item_id in ids:
            self.check_known(item_id)
        return ids

    @staticmethod
    def _json_object(value, field: str):
        """A form field holding a JSON object (None when empty)."""
        if value in (None, ""):
            return None
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ServiceError(400, f"'{field}' is not valid JSON ({e.msg} at character {e.pos})") from None
        if not isinstance(value, dict):
            raise ServiceError(400, f"'{field}' must be a JSON object")
        return value

    def add(self, data: bytes, item_id: str | None = None, metadata: str | dict | None = None) -> dict:
        meta = self._json_object(metadata, "metadata")
        img = self.image(data)
        item_id = self.check_id(item_id) if item_id else uuid.uuid4().hex[:16]
        if item_id in self.index.snapshot.position:
            raise ServiceError(409, f"id {item_id!r} is already in the index")
        if self.engine.model.caption_level and self.captioner is None:
            raise ServiceError(422, f"method {self.engine.model.name} needs a caption of every image and this "
                                    "service has no captioner")
        folder = self.index.folder / "images"
        folder.mkdir(exist_ok=True)
        path = folder / f"{item_id}{FORMATS.get(img.format, '.png')}"
        write_atomic(path, lambda f: f.write(data))
        try:
            self.engine.add([(item_id, str(path))], captioner=self.captioner, metas=[meta or {}])
        except CirlabError as e:
            path.unlink(missing_ok=True)
            raise ServiceError(409 if "already" in str(e) else 400, str(e)) from None
        return {"id": item_id}

    def remove(self, item_id: str) -> dict:
        self.check_known(item_id)
        try:
            paths = self.index.remove([item_id])
        except KeyError:
            raise ServiceError(404, f"unknown image id {item_id!r}") from None
        uploads = (self.index.folder / "images").resolve()
        for p in map(Path, paths):  # only files the service itself stored; built items point to the user's files
            if p.resolve().parent == uploads:
                p.unlink(missing_ok=True)
        return {"id": item_id, "removed": True}

    def health(self) -> dict:
        m = self.index.manifest
        out = {"status": "ok", "items": len(self.index)}
        return out | ({"search": {"backend": m["backend"]} | m.get("actual", {}) | {"tuned": m["tuned"]}}
                      if "tuned" in m else {})
