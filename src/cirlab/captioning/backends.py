"""Captioning backends: each turns a batch of (image path, chat messages) into answer texts.

- `hf`: any transformers image-text-to-text model (AutoModelForImageTextToText and its processor's chat template),
  by Hugging Face id or local folder, greedy decoding, left-padded batches.
- `openai`: an OpenAI-compatible chat-completions endpoint (vLLM, `transformers serve`, a hosted API); images go
  as base64 PNG data URLs; requests run with bounded concurrency, a timeout each, and retries with exponential
  back-off on connection errors, timeouts, 408, 409, 429 and 5xx answers.
- `oracle`: answers from the synthetic world's scene graphs, in the same JSON the MCoT prompt asks a model for, so
  the whole pipeline (parse, repair, fallback, cache) runs without a model. Its `latency_s` stands in for a real
  model's time per batch, to rehearse interruption and resumption.
"""
from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from cirlab.data.images import open_image
from cirlab.errors import CirlabError

RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class CaptionBackend(Protocol):
    model_id: str

    def generate(self, images: list, messages: list) -> list:
        """One answer text per (image path, message list)."""


class OracleBackend:
    model_id = "cirlab-oracle"

    def __init__(self, scenes_file, latency_s: float = 0.0):
        from cirlab.data.synth.world import graph_to_scene

        path = Path(scenes_file)
        if not path.exists():
            raise CirlabError(f"the oracle captioner needs the synthetic world's scene graphs: {path} not found")
        graphs = json.loads(path.read_text())
        self.scenes = {k: graph_to_scene(g) for k, g in graphs.items()}
        self.latency_s = latency_s

    def generate(self, images: list, messages: list) -> list:
        from cirlab.data.synth.world import oracle_captions

        if self.latency_s:
            time.sleep(self.latency_s)
        out = []
        for path in images:
            scene = self.scenes.get(Path(path).stem)
            if scene is None:
                raise CirlabError(f"the oracle has no scene graph for {path}")
            out.append(json.dumps(oracle_captions(scene)))
        return out


def oracle_for(dataset: str, data_root, latency_s: float = 0.0) -> OracleBackend:
    root = Path(data_root)
    if dataset == "synth":
        return OracleBackend(root / "synth" / "scenes.json", latency_s)
    if dataset == "synth-circo":
        return OracleBackend(root / "circo" / "synth_scenes.json", latency_s)
    raise CirlabError(f"the oracle captioner knows only the synthetic world, not {dataset!r}")


class HFBackend:
    """A transformers image-text-to-text model; `generate` runs one batch with greedy decoding."""

    def __init__(self, model: str, device: str = "cpu", max_new_tokens: int = 256, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from cirlab.backbones.base import NO_HUB_KERNELS

        try:
            self.processor = AutoProcessor.from_pretrained(model)
            kwargs = dict(NO_HUB_KERNELS) | ({} if dtype == "auto" else {"dtype": getattr(torch, dtype)})
            self.model = AutoModelForImageTextToText.from_pretrained(model, **kwargs).to(device).eval()
        except (OSError, ValueError) as e:
            raise CirlabError(f"cannot load image-text-to-text model {model!r}: {e}") from None
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None:
            tok.padding_side = "left"  # generation continues each row from its last prompt token
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
        self.model_id = Path(model).name if Path(model).exists() else model
        self.device, self.max_new_tokens = device, max_new_tokens

    def generate(self, images: list, messages: list) -> list:
        import torch

        texts = [self.processor.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
        pics = [[open_image(p)] for p in images]
        inputs = self.processor(text=texts, images=pics, padding=True, return_tensors="pt").to(self.device)
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)


def _data_url(path) -> str:
    buf = io.BytesIO()
    open_image(path).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def openai_messages(messages: list, image_url: str) -> list:
    """cirlab's chat messages (an {"type": "image"} placeholder) in the OpenAI chat format."""
    out = []
    for m in messages:
        content = []
        for part in m["content"]:
            if part["type"] == "image":
                content.append({"type": "image_url", "image_url": {"url": image_url}})
            else:
                content.append({"type": "text", "text": part["text"]})
        out.append({"role": m["role"], "content": content})
    return out


class OpenAIBackend:
    """An OpenAI-compatible /chat/completions endpoint.

    base_url defaults to $CIRLAB_OPENAI_BASE_URL, then $OPENAI_BASE_URL; the key to $CIRLAB_OPENAI_API_KEY, then
    $OPENAI_API_KEY (a local server may need none).
    """

    def __init__(self, model: str, base_url: str | None = None, api_key: str | None = None, timeout_s: float = 120.0,
                 retries: int = 4, backoff_s: float = 1.0, concurrency: int = 4, max_tokens: int = 512):
        base_url = base_url or os.environ.get("CIRLAB_OPENAI_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise CirlabError("the openai backend needs a base URL: --base-url, or $CIRLAB_OPENAI_BASE_URL or "
                              "$OPENAI_BASE_URL (for example http://127.0.0.1:8000/v1)")
        if concurrency < 1:
            raise CirlabError(f"concurrency must be at least 1, got {concurrency}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key or os.environ.get("CIRLAB_OPENAI_API_KEY") or os.environ.get("OPENAI_API_KEY")
        self.model_id, self.timeout_s, self.retries, self.backoff_s = model, timeout_s, retries, backoff_s
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.retried = 0  # retries made, over all requests
        self.requests = 0  # requests asked for (each retried one counts once)
        self._count = threading.Lock()

    def _post(self, body: dict) -> dict:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                self.retried += 1
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in RETRY_STATUS:
                    raise CirlabError(f"{self.url} answered {e.code}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            except json.JSONDecodeError as e:
                raise CirlabError(f"{self.url} answered with something that is not JSON: {e}") from None
        raise CirlabError(f"{self.url} failed after {self.retries + 1} attempts; last error: {last}")

    def _one(self, path, messages: list) -> str:
        return self._answer({"model": self.model_id, "messages": openai_messages(messages, _data_url(path)),
                             "max_tokens": self.max_tokens, "temperature": 0})

    def chat(self, messages: list, temperature: float = 0.0, seed: int | None = None) -> str:
        """The answer to text-only chat messages (cirlab's format)."""
        body = {"model": self.model_id, "messages": openai_messages(messages, ""), "max_tokens": self.max_tokens,
                "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        return self._answer(body)

    def _answer(self, body: dict) -> str:
        with self._count:
            self.requests += 1
        answer = self._post(body)
        try:
            return answer["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise CirlabError(f"{self.url} answered without choices[0].message.content: {str(answer)[:300]}") from None

    def generate(self, images: list, messages: list) -> list:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, images, messages))


def make_backend(name: str, dataset: str, data_root, **options):
    """The backend `name` (oracle, hf or openai); each reads the options it knows (None means its default) and
    ignores the others, so one set of command-line options serves all three."""
    if name == "oracle":
        return oracle_for(dataset, data_root, options.get("latency_s", 0.0))
    if name == "hf":
        if not options.get("model"):
            raise CirlabError("the hf backend needs --model (a Hugging Face id or a local folder)")
        return HFBackend(options["model"], options.get("device", "cpu"), options.get("max_new_tokens", 256))
    if name == "openai":
        if not options.get("model"):
            raise CirlabError("the openai backend needs --model (the model name the server serves)")
        keep = ("base_url", "api_key", "timeout_s", "retries", "concurrency")
        kwargs = {k: v for k, v in options.items() if k in keep and v is not None}
        if options.get("max_new_tokens"):
            kwargs["max_tokens"] = options["max_new_tokens"]
        return OpenAIBackend(options["model"], **kwargs)
    raise CirlabError(f"unknown captioning backend {name!r}: oracle, hf or openai")
