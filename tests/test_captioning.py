"""MCoT captioning: parsing, repair and fallback, the resumable cache (killed for real), the oracle backend."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cirlab.captioning.cache import CaptionCache
from cirlab.captioning.prompt import KEYS, PROMPT_VERSION, MalformedAnswer, fallback_levels, parse_answer
from cirlab.captioning.run import caption_images
from helpers.cli import run_cli

GOOD = {"global": "a photo", "objects": "a red dress", "details": "lace trim", "final_caption": "a red lace dress"}


def test_parse_answer_finds_the_json_in_fences_and_prose():
    assert parse_answer(json.dumps(GOOD)) == GOOD
    assert parse_answer("Sure! Here it is:\n```json\n" + json.dumps(GOOD) + "\n```\nHope it helps.") == GOOD
    with pytest.raises(MalformedAnswer) as err:
        parse_answer('{"global": "a photo", "objects": "a red dress"')  # cut off
    assert err.value.levels == {"global": "a photo", "objects": "a red dress"}
    with pytest.raises(MalformedAnswer) as err:
        parse_answer('{"global": "x", "final_caption": ""}')
    assert "final_caption" in str(err.value)


def test_fallback_uses_the_finest_usable_level():
    assert fallback_levels({"global": "g", "objects": "o"})["final_caption"] == "o"
    assert fallback_levels({"global": "g", "details": "d"})["final_caption"] == "d"
    assert fallback_levels({}) is None


class ScriptedBackend:
    """A backend that answers from a script: first answers, then answers to repair prompts."""
    model_id = "scripted"

    def __init__(self, first: dict, repaired: dict):
        self.first, self.repaired, self.calls = first, repaired, []

    def generate(self, images, messages):
        self.calls.append(len(messages[0]))
        table = self.first if len(messages[0]) == 1 else self.repaired
        return [table[p] for p in images]


def test_a_first_answer_with_usable_levels_is_kept_when_the_repair_has_none(tmp_path):
    """The first answer holds two levels, the repair answers in prose: the image falls back to the first answer's
    finest level instead of counting as failed."""
    first = {"e": '{"global": "a scene", "objects": "a red cube"'}
    repaired = {"e": "Sorry, I cannot produce JSON."}
    stats = caption_images([("e", "e")], ScriptedBackend(first, repaired), CaptionCache(tmp_path / "c.jsonl"),
                           batch_size=1, progress=False)
    assert (stats.captioned, stats.fallbacks, stats.failures) == (1, 1, 0)
    rec = CaptionCache(tmp_path / "c.jsonl").records[("e", PROMPT_VERSION)]
    assert rec["final_caption"] == "a red cube" and rec["fallback"] is True


def test_repair_then_fallback_then_failure_are_counted(tmp_path):
    items = [("a", "a"), ("b", "b"), ("c", "c"), ("d", "d")]
    first = {"a": json.dumps(GOOD), "b": "not json", "c": "still not", "d": "nothing"}
    repaired = {"b": json.dumps(GOOD), "c": '{"global": "g", "objects": "a blue shirt"', "d": "no idea"}
    cache = CaptionCache(tmp_path / "c.jsonl")
    stats = caption_images(items, ScriptedBackend(first, repaired), cache, batch_size=4, progress=False)
    assert (stats.captioned, stats.repaired, stats.fallbacks, stats.failures) == (3, 1, 1, 1)
    recs = CaptionCache(tmp_path / "c.jsonl").records
    assert set(recs) == {("a", PROMPT_VERSION), ("b", PROMPT_VERSION), ("c", PROMPT_VERSION)}
    assert recs[("c", PROMPT_VERSION)]["final_caption"] == "a blue shirt"
    assert recs[("c", PROMPT_VERSION)]["fallback"] is True and recs[("a", PROMPT_VERSION)]["fallback"] is False
    assert recs[("a", PROMPT_VERSION)]["model"] == "scripted"
    assert all(set(r) >= {"image", "levels", "final_caption", "model", "prompt_version", "prompt_hash"}
               for r in recs.values())
    # a rerun asks only for the failed image
    again = caption_images(items, ScriptedBackend(first, repaired), CaptionCache(tmp_path / "c.jsonl"), 4,
                           progress=False)
    assert (again.cached, again.failures) == (3, 1)


def test_a_torn_last_line_is_cut_back(tmp_path):
    path = tmp_path / "c.jsonl"
    cache = CaptionCache(path)
    cache.append([{"image": "a", "prompt_version": "v", "final_caption": "x"}])
    with open(path, "a") as f:
        f.write('{"image": "b", "prompt_ver')
    assert len(CaptionCache(path)) == 1
    assert path.read_text().endswith("}\n")


def _cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "cirlab.cli.main", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_oracle_captions_survive_a_kill(world, tmp_path):
    from cirlab.data.readers import read_split

    names = set(read_split("synth", world, "val").gallery)
    cache = tmp_path / "captions.jsonl"
    args = ("caption", "--data-root", world, "--split", "val", "--backend", "oracle", "--out", cache,
            "--batch-size", "8", "--no-progress")
    proc = _cli(*args, "--oracle-latency", "0.05")
    deadline = time.time() + 120
    while time.time() < deadline and (not cache.exists() or cache.read_text().count("\n") < 40):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = cache.read_text().count("\n")
    assert 40 <= partial < len(names), "the run was killed part-way"
    done = run_cli(*args)  # the resumed run, in this process
    assert done.returncode == 0, done.stderr
    assert f"{partial} already cached" in done.stdout
    lines = cache.read_text().splitlines()
    keys = [(json.loads(line)["image"], json.loads(line)["prompt_version"]) for line in lines]
    assert len(keys) == len(set(keys)) == len(names)
    assert {k[0] for k in keys} == names
    clean = tmp_path / "clean.jsonl"
    assert run_cli(*args[:-3], "--out", clean, "--no-progress").returncode == 0
    assert sorted(lines) == sorted(clean.read_text().splitlines())
    rec = json.loads(lines[0])
    assert (set(rec["levels"]) | {"final_caption"}) == set(KEYS)
    assert rec["model"] == "cirlab-oracle" and rec["fallback"] is False


def test_the_caption_reader_keeps_a_whole_unterminated_last_line_and_drops_a_partial_one(tmp_path):
    """One reader for caption files: a hand-written file may end without a newline (its last record counts); a
    file still being written may end in a partial line (left out, the file untouched); a bad line elsewhere is named."""
    from cirlab.data.split import read_caption_records
    from cirlab.errors import CirlabError

    def rec(i):
        return json.dumps({"image": f"a{i}", "final_caption": f"caption {i}", "levels": {"objects": "x"}})
    (tmp_path / "hand.jsonl").write_text(rec(1) + "\n" + rec(2))
    (tmp_path / "writing.jsonl").write_text(rec(1) + "\n" + rec(2)[:25])
    (tmp_path / "bad.jsonl").write_text(rec(1) + "\n{oops\n" + rec(2) + "\n")
    assert sorted(read_caption_records(tmp_path / "hand.jsonl")) == ["a1", "a2"]
    before = (tmp_path / "writing.jsonl").read_bytes()
    assert sorted(read_caption_records(tmp_path / "writing.jsonl")) == ["a1"]
    assert (tmp_path / "writing.jsonl").read_bytes() == before
    with pytest.raises(CirlabError, match="bad.jsonl: line 2"):
        read_caption_records(tmp_path / "bad.jsonl")
