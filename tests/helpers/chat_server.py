"""An OpenAI-compatible chat-completions server for tests, run as its own process on 127.0.0.1.

It recognises each image it is sent by its decoded pixels (sha1 of the RGB array) among a synthetic world's
images and answers the MCoT prompt with the world's oracle captions, so a client test can compare what arrives in
the cache with the oracle. Failure injection: `--fail-first N` answers 503 to the first N requests,
`--malformed IMAGE_STEM` answers prose (not JSON) the first time that image is asked, and `--delay S` sleeps per
request. It prints "ready PORT" once listening and logs one JSON line per request to --log.

    python tests/helpers/chat_server.py --data-root WORLD --port 0 --log requests.jsonl
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def pixel_key(img: Image.Image) -> str:
    return hashlib.sha1(np.asarray(img.convert("RGB")).tobytes()).hexdigest()


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--log", required=True)
    ap.add_argument("--fail-first", type=int, default=0)
    ap.add_argument("--malformed", action="append", default=[])
    ap.add_argument("--prose", action="store_true", help="answer every request, repairs included, in prose")
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--api-key")
    ap.add_argument("--folder", action="append", help="image folders of the world to recognise (default: dev)")
    return ap.parse_args()


def make_handler(args, graphs: dict, by_pixels: dict) -> type:
    """The request handler: recognises the image by its pixels and answers with its oracle captions (or fails as
    the options ask: the first requests, malformed or prose answers, a wrong key)."""
    from cirlab.data.synth.world import graph_to_scene, oracle_captions

    lock = threading.Lock()
    state = {"requests": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with lock:
                state["requests"] += 1
                n = state["requests"]
            if args.delay:
                time.sleep(args.delay)
            if self.path != "/v1/chat/completions":
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            if args.api_key and self.headers.get("Authorization") != f"Bearer {args.api_key}":
                return self._send(401, {"error": {"message": "bad key"}})
            if n <= args.fail_first:
                return self._send(503, {"error": {"message": "warming up"}})
            url = next(p["image_url"]["url"] for p in body["messages"][0]["content"] if p["type"] == "image_url")
            img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
            stem = by_pixels.get(pixel_key(img))
            repair = len(body["messages"]) > 1
            with open(args.log, "a") as f:
                f.write(json.dumps({"n": n, "image": stem, "repair": repair, "model": body.get("model")}) + "\n")
            if stem is None:
                return self._send(400, {"error": {"message": "unknown image"}})
            if args.prose or (stem in args.malformed and not repair):
                text = "I think this shows some shapes, but I will not answer in JSON."
            else:
                text = "```json\n" + json.dumps(oracle_captions(graph_to_scene(graphs[stem]))) + "\n```"
            self._send(200, {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": body.get("model"),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]})

    return Handler


def main() -> None:
    args = parse()
    root = Path(args.data_root)
    graphs = json.loads((root / "synth" / "scenes.json").read_text())
    by_pixels = {}
    for split in args.folder or ["dev"]:
        for png in sorted((root / split).glob("*.png")):
            by_pixels[pixel_key(Image.open(png))] = png.stem
    server = ThreadingHTTPServer(("127.0.0.1", args.port), make_handler(args, graphs, by_pixels))
    print(f"ready {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    sys.exit(0)

if __name__ == "__main__":
    main()
