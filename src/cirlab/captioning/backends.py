"""Captioning backends: each turns a batch of (image path, chat messages) into answer texts.

`oracle` answers from the synthetic world's scene graphs, in the same JSON the MCoT prompt asks a model for, so
the whole pipeline (parse, repair, fallback, cache) runs without a model. Its `latency_s` stands in for a real
model's time per batch, to rehearse interruption and resumption. The `hf` and `openai` backends are the next step
of the CSMCIR issue.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Protocol

from cirlab.errors import CirlabError


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
