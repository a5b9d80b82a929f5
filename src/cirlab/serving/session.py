"""Search that converses: a session of turns over one engine, each turn's reference a result of the turn before.

A turn takes a text and a reference: an image (a PIL image or an indexed id) for the first turn or to start over,
and after that by default the result the user chose from the previous turn (`choose`), else its top result. Each
turn keeps its reference, text, options and hits, so a session is a plain JSON document (`to_json`, `from_json`)
that the CLI keeps in a file and the service in memory.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from cirlab.errors import CirlabError


@dataclass
class Turn:
    text: str
    reference: str  # an indexed id, or "upload" for an image that is not indexed
    k: int = 10
    filter: dict | None = None
    hits: list = field(default_factory=list)  # [{"id", "score"}], best first
    chosen: str | None = None  # the result the user refines next


class Session:
    def __init__(self, engine, turns: list | None = None):
        self.engine, self.turns = engine, list(turns or [])

    def next_reference(self) -> str:
        """The reference a turn without an image takes: the previous turn's chosen result, else its top one."""
        if not self.turns:
            raise CirlabError("the first turn of a session needs a reference image (an image or an indexed id)")
        last = self.turns[-1]
        if last.chosen:
            return last.chosen
        if not last.hits:
            raise CirlabError("the previous turn found nothing to refine; give a reference image")
        return last.hits[0]["id"]

    def turn(self, text: str, image=None, k: int = 10, filter: dict | None = None, more: list = (),
             less: list = ()) -> Turn:
        """Search with `text` from `image` (PIL image or indexed id) or, when None, from `next_reference()`; the
        session's earlier references are left out of the results, as a turn's own reference is; `more` and `less`
        are feedback (Engine.search)."""
        if not text.strip():
            raise CirlabError("a turn needs a text that says what to change")
        query = self.next_reference() if image is None else image
        seen = {t.reference for t in self.turns} - {"upload"}
        hits = self.engine.search(query, text, k + len(seen), filter=filter, more=more, less=less)
        hits = [h for h in hits if h.id not in seen][:k]
        turn = Turn(text, query if isinstance(query, str) else "upload", k, filter,
                    [{"id": h.id, "score": round(h.score, 6)} for h in hits])
        self.turns.append(turn)
        return turn

    def choose(self, item_id: str) -> None:
        """Mark one of the last turn's results as the one to refine next."""
        if not self.turns:
            raise CirlabError("nothing to choose from: the session has no turn yet")
        if item_id not in {h["id"] for h in self.turns[-1].hits}:
            raise CirlabError(f"{item_id!r} is not among the last turn's results")
        self.turns[-1].chosen = item_id

    def to_json(self) -> dict:
        return {"turns": [asdict(t) for t in self.turns]}

    @classmethod
    def from_json(cls, engine, doc: dict) -> "Session":
        try:
            return cls(engine, [Turn(**t) for t in doc.get("turns", [])])
        except (TypeError, AttributeError) as e:
            raise CirlabError(f"not a session document: {e}") from None
