"""The hf and openai captioning backends: a tiny local VLM, and a real HTTP server on 127.0.0.1."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cirlab.captioning.backends import HFBackend, OpenAIBackend
from cirlab.captioning.cache import CaptionCache
from cirlab.captioning.prompt import PROMPT_VERSION, messages, parse_answer
from cirlab.captioning.run import caption_images
from cirlab.errors import CirlabError
from helpers.cli import run_cli

HELPERS = Path(__file__).parent / "helpers"
ANSWER = {"global": "a grey picture", "objects": "some shapes", "details": "none", "final_caption": "shapes on grey"}


def _images(world, n):
    """The first n val images whose pixels no other val image shares (the test server tells images by pixels)."""
    from collections import Counter

    from PIL import Image

    sys.path.insert(0, str(HELPERS))
    from chat_server import pixel_key

    from cirlab.data.readers import read_split

    items = sorted(read_split("synth", world, "val").gallery.items())[:3 * n]
    keys = {name: pixel_key(Image.open(path)) for name, path in items}
    count = Counter(keys.values())
    return [(name, path) for name, path in items if count[keys[name]] == 1][:n]


@pytest.fixture(scope="module")
def tiny_vlm(world, tmp_path_factory):
    sys.path.insert(0, str(HELPERS))
    from tiny_vlm import build_tiny_vlm

    folder = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    return build_tiny_vlm(folder, json.dumps(ANSWER), [p for _, p in _images(world, 2)])


def test_hf_backend_loads_a_folder_and_captions_through_the_pipeline(tiny_vlm, world, tmp_path):
    backend = HFBackend(str(tiny_vlm), max_new_tokens=len(json.dumps(ANSWER)) + 4)
    assert not getattr(backend.model, "use_kernels", False)  # no Hub kernels (see backbones/base.py)
    items = _images(world, 3)
    answers = backend.generate([items[0][1]], [messages(repair_of="oops")])  # a repair conversation renders too
    assert len(answers) == 1 and isinstance(answers[0], str)
    stats = caption_images(items, backend, CaptionCache(tmp_path / "c.jsonl"), batch_size=3, progress=False)
    assert (stats.captioned, stats.failures) == (3, 0)
    recs = CaptionCache(tmp_path / "c.jsonl").records
    rec = recs[(items[2][0], PROMPT_VERSION)]
    assert rec["final_caption"] == "shapes on grey" and rec["model"] == "tiny-llava"
    assert rec["levels"] == {k: ANSWER[k] for k in ("global", "objects", "details")}


def test_hf_backend_names_what_it_cannot_load(tmp_path):
    with pytest.raises(CirlabError, match="cannot load image-text-to-text model"):
        HFBackend(str(tmp_path / "nothing-here"))


@pytest.fixture()
def chat_server(world, tmp_path):
    procs = []

    def start(*extra):
        log = tmp_path / f"requests{len(procs)}.jsonl"
        proc = subprocess.Popen([sys.executable, str(HELPERS / "chat_server.py"), "--data-root", str(world),
                                 "--log", str(log), *extra], stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stdout.readline()
        assert line.startswith("ready"), line
        return f"http://127.0.0.1:{line.split()[1]}/v1", log

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_openai_backend_against_a_real_server(chat_server, world, tmp_path):
    """Retries past 503s, repairs a prose answer, and the cache holds exactly the oracle's captions."""
    from cirlab.data.synth.world import graph_to_scene, oracle_captions

    items = _images(world, 30)
    bad = items[7][0]
    url, log = chat_server("--fail-first", "2", "--malformed", bad, "--api-key", "k3y", "--delay", "0.05")
    backend = OpenAIBackend("oracle-chat", base_url=url, api_key="k3y", concurrency=4, backoff_s=0.05)
    stats = caption_images(items, backend, CaptionCache(tmp_path / "c.jsonl"), batch_size=8, progress=False)
    assert (stats.captioned, stats.repaired, stats.fallbacks, stats.failures) == (30, 1, 0, 0)
    assert backend.retried >= 2
    served = [json.loads(line) for line in log.read_text().splitlines()]
    assert sorted(r["image"] for r in served if not r["repair"]) == sorted(n for n, _ in items)
    assert [r["image"] for r in served if r["repair"]] == [bad]
    graphs = json.loads((Path(world) / "synth" / "scenes.json").read_text())
    for (name, _), rec in zip(items, [CaptionCache(tmp_path / "c.jsonl").records[(n, PROMPT_VERSION)]
                                      for n, _ in items]):
        assert rec["final_caption"] == oracle_captions(graph_to_scene(graphs[name]))["final_caption"]
        assert rec["model"] == "oracle-chat"


def test_openai_backend_errors_are_clear(chat_server, world, monkeypatch):
    url, _ = chat_server("--api-key", "right")
    img = [_images(world, 1)[0][1]]
    with pytest.raises(CirlabError, match="answered 401"):
        OpenAIBackend("m", base_url=url, api_key="wrong").generate(img, [messages()])
    monkeypatch.setenv("CIRLAB_OPENAI_BASE_URL", url)  # base URL and key from the environment
    monkeypatch.setenv("CIRLAB_OPENAI_API_KEY", "right")
    assert parse_answer(OpenAIBackend("m").generate(img, [messages()])[0])["final_caption"]
    dead = OpenAIBackend("m", base_url="http://127.0.0.1:9/v1", retries=2, backoff_s=0.01, timeout_s=2)
    with pytest.raises(CirlabError, match="failed after 3 attempts"):
        dead.generate(img, [messages()])
    monkeypatch.delenv("CIRLAB_OPENAI_BASE_URL")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(CirlabError, match="needs a base URL"):
        OpenAIBackend("m")


def test_caption_cli_with_the_openai_backend(chat_server, world, tmp_path):
    from cirlab.data.readers import read_split

    url, _ = chat_server()
    out = tmp_path / "val.jsonl"
    done = run_cli("caption", "--data-root", world, "--split", "val", "--backend", "openai", "--model", "oracle-chat",
                   "--base-url", url, "--concurrency", "8", "--limit", "200", "--out", out, "--no-progress")
    assert done.returncode == 0, done.stderr
    assert len(read_split("synth", world, "val").gallery) > 200  # --limit: the first 200 in name order
    assert "200 captioned" in done.stdout and len(out.read_text().splitlines()) == 200


def test_caption_exits_non_zero_when_no_image_was_captioned(chat_server, world, tmp_path):
    """Every answer unusable (prose, the repair's too): the command fails with one line that counts the failures,
    and names no cache, since it wrote none."""
    url, _ = chat_server("--prose")
    out = tmp_path / "none.jsonl"
    done = run_cli("caption", "--data-root", world, "--split", "val", "--backend", "openai", "--model", "oracle-chat",
                   "--base-url", url, "--retries", "0", "--limit", "5", "--out", out, "--no-progress")
    assert done.returncode != 0 and "no image was captioned" in done.stderr and "5 failed" in done.stderr, done
    assert "cache:" not in done.stdout and not out.exists()


@pytest.fixture()
def transformers_serve(tiny_vlm, tmp_path):
    """`transformers serve` (the `cirlab[llm]` extra) on 127.0.0.1 with the tiny VLM, behind a counting proxy of
    our own; yields (the proxy's url, requests), requests() the number of chat requests the server was sent."""
    import socket
    import threading
    import time
    import urllib.error
    import urllib.request
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    exe = Path(sys.executable).with_name("transformers")
    with open(log, "w") as out:
        proc = subprocess.Popen([str(exe), "serve", str(tiny_vlm), "--host", "127.0.0.1", "--port", str(port),
                                 "--device", "cpu"], stdout=out, stderr=subprocess.STDOUT)
    upstream, sent = f"http://127.0.0.1:{port}", []

    class Proxy(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            sent.append(self.path)
            req = urllib.request.Request(upstream + self.path, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    code, data = r.status, r.read()
            except urllib.error.HTTPError as e:
                code, data = e.code, e.read()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    proxy = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(upstream + "/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, log.read_text()[-3000:]
                assert time.time() < deadline, "transformers serve did not answer /health in 180 s"
                time.sleep(0.5)
        yield f"http://127.0.0.1:{proxy.server_address[1]}/v1", lambda: len(sent)
    finally:
        proxy.shutdown()
        proc.kill()
        proc.wait()


def test_caption_and_caption_compose_against_transformers_serve(transformers_serve, tiny_vlm, clip_dir, world,
                                                                tmp_path):
    """A real OpenAI-compatible server with a tiny model built from a config: the pipeline runs, counts what failed,
    caches, and a second run asks only what failed before (nothing when nothing failed)."""
    import re

    url, requests = transformers_serve
    caps = tmp_path / "caps.jsonl"
    args = ("caption", "--data-root", world, "--split", "val", "--backend", "openai", "--model", tiny_vlm,
            "--base-url", url, "--concurrency", "1", "--retries", "0", "--limit", "3", "--max-new-tokens",
            str(len(json.dumps(ANSWER)) + 4), "--out", caps, "--no-progress")
    first = run_cli(*args)
    m = re.search(r"3 images: 0 already cached, (\d+) captioned \((\d+) after a repair prompt.*?(\d+) failed",
                  first.stdout + first.stderr)
    assert m, first
    captioned, repaired, failed = map(int, m.groups())
    assert captioned + failed == 3 and captioned >= 1 and first.returncode == 0
    assert len(caps.read_text().splitlines()) == captioned
    asked = requests()
    assert asked >= 3  # one per image, plus a repair per malformed answer
    second = run_cli(*args)
    assert f"3 images: {captioned} already cached" in second.stdout
    assert requests() - asked == 2 * failed  # only the failures are asked again (first answer and repair)

    ckpt = tmp_path / "cc"
    assert run_cli("init", "--method", "caption_compose", "--backbone", clip_dir, "--out", ckpt, "--composer",
                   "openai", "--composer-model", tiny_vlm, "--composer-base-url", url).returncode == 0
    before = requests()
    evals = [run_cli("eval", "--checkpoint", ckpt, "--data-root", world, "--split", "val", "--limit", "4",
                     "--json", tmp_path / f"e{n}.json", "--no-progress") for n in range(2)]
    notes = [json.loads((tmp_path / f"e{n}.json").read_text())["notes"] for n in range(2)]
    assert all(e.returncode == 0 for e in evals), evals
    assert notes[0]["asked"] == 4 and notes[0]["composed"] + notes[0]["failed"] == 4
    assert notes[0]["requests"] == 4 and len((ckpt / "cache" / "compose.jsonl").read_text().splitlines()) == \
        notes[0]["composed"]
    assert notes[1]["requests"] == notes[0]["failed"] and notes[1]["cached"] == notes[0]["composed"]
    assert requests() - before == 4 + notes[0]["failed"]  # the server saw exactly what the notes count
