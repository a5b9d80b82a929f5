"""What "search your own photos" costs on this machine with a CLIP of real size: the README's three commands, timed.

    python bench/own_photos.py --images FOLDER [--n 64] [--queries 20] [--out docs/results/own_photos_cost.json]

No weights can be downloaded here, so the CLIP is built from the configuration of openai/clip-vit-large-patch14
(ViT-L/14 at 224 pixels, a 12-layer text tower, 768-wide projections; 428M parameters) with random weights: the
same computation as the real checkpoint, so the times hold, the rankings mean nothing. It is saved like any
Hugging Face CLIP folder, then driven through the CLI exactly as a user would: `cirlab index build --method sum
--backbone FOLDER` over the first N images of FOLDER, then `cirlab search` by an indexed id, Q times in one
process (the model loads once, as in `cirlab serve`). Threads: torch's default (every core) unless
OMP_NUM_THREADS says otherwise; the figure file records the count.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def build_clip_large(folder: Path) -> int:
    import torch
    from transformers import CLIPConfig, CLIPModel

    from cirlab.backbones.clip import ClipBackbone
    from cirlab.backbones.configs import Preprocess, clip_tokenizer

    cfg = CLIPConfig(
        text_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                         max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
        vision_config=dict(image_size=224, patch_size=14, hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16),
        projection_dim=768)
    torch.manual_seed(0)
    model = CLIPModel(cfg)
    ClipBackbone(model, clip_tokenizer(77), Preprocess(size=224), "clip-vit-large-patch14-shaped").save_pretrained(
        folder)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    import torch

    from cirlab.cli.main import main as cirlab
    from cirlab.serving.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="own-photos-"))
    try:
        t0 = time.perf_counter()
        params = build_clip_large(work / "clip")
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert cirlab(["index", "build", "--method", "sum", "--backbone", str(work / "clip"), "--images",
                       args.images, "--limit", str(args.n), "--out", str(work / "ix"), "--no-progress"]) == 0
        t_index = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = Engine(work / "ix")
        t_load = time.perf_counter() - t0
        ids = engine.index.ids
        times = []
        for n in range(args.queries):
            t0 = time.perf_counter()
            engine.search(ids[n % len(ids)], "make the circle red", 10)
            times.append(time.perf_counter() - t0)
        times.sort()
        result = {"backbone": "CLIP ViT-L/14 shape (openai/clip-vit-large-patch14's config), random weights",
                  "parameters": params, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                  "images": len(ids), "build_backbone_s": round(t_build, 2),
                  "index_build_s": round(t_index, 2), "index_images_per_s": round(len(ids) / t_index, 2),
                  "engine_load_s": round(t_load, 2), "queries": len(times),
                  "search_p50_ms": round(1000 * times[len(times) // 2], 1),
                  "search_max_ms": round(1000 * times[-1], 1)}
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
