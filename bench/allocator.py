"""Training step time of each demo lane under each allocator choice (src/cirlab/allocator.py).

    python bench/allocator.py DEMO_OUT [--rounds 3] [--lanes csmcir,combiner,...] [--json docs/results/x.json]

DEMO_OUT is a finished default demo's folder (its world and pretrained backbones). For each round and lane, one
fresh process per choice in turn (system: glibc as it starts; glibc: tuned; tcmalloc: preloaded), each timing 15
steps of the lane's batch after 2 warm-up steps (AdamW fused, the demo's batch size and threads). Prints and
writes each run's ms/step, the median per choice, and the median's speed-up over "system". Runs alternate so that
the host's drift falls on every choice alike.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# lane -> (batch size, threads): the demo's settings (threads: CLIP pretraining runs alone with every core)
LANES = {"csmcir": (16, 1), "combiner": (64, 1), "tmcir": (64, 1), "mapcompose": (128, 1), "pic2word": (128, 1),
         "pretrain-clip": (128, 2), "pretrain-blip2": (128, 1)}
CHOICES = ("system", "glibc", "tcmalloc")


def _source(lane: str, root: str):
    """(model with a .loss, list of 17 batches) for one lane, built from the demo's folder."""
    import torch

    from cirlab.backbones import load_backbone
    from cirlab.data.readers import read_split
    from cirlab.experiments.bench import _source as method_source
    from cirlab.experiments.profiles import PROFILES
    from cirlab.training.pretrain import ContrastivePretrainer, backbone_and_pairs

    batch, _ = LANES[lane]
    data = read_split("synth", f"{root}/data", "train")
    torch.manual_seed(0)
    if lane.startswith("pretrain-"):
        kind = lane.removeprefix("pretrain-")
        bb, source, _ = backbone_and_pairs(kind, data, PROFILES["full"].backbones[kind]["config"],
                                           f"{root}/checkpoints/backbone-clip" if kind == "blip2" else None)
        model = ContrastivePretrainer(bb)
    else:
        from cirlab.methods import build_model

        kind = "blip2" if lane == "csmcir" else "clip"
        bb = load_backbone(kind, f"{root}/checkpoints/backbone-{kind}")
        if kind == "blip2":
            bb.model.vision_model.requires_grad_(False)
        model = build_model(lane, bb, {"stage": "mapping"} if lane in ("mapcompose", "pic2word") else None)
        source = method_source(model, data, lane in ("mapcompose", "pic2word"))
    return model, [source.batch(list(range(i * batch, (i + 1) * batch))) for i in range(17)]


def child(lane: str, root: str) -> None:
    import torch

    from cirlab import allocator
    from cirlab.training.loop import TrainConfig, _optimizer

    allocator.reexec()
    malloc = allocator.prepare()
    torch.set_num_threads(LANES[lane][1])
    model, batches = _source(lane, root)
    opt, _ = _optimizer(model, TrainConfig(lr=1e-4), 1000)
    model.train()
    for i, batch in enumerate(batches):
        if i == 2:
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(batch).loss.backward()
        opt.step()
    print(json.dumps({"allocator": malloc, "ms_per_step": round((time.perf_counter() - t) * 1000 / 15, 1)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo_out")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lanes", default=",".join(LANES))
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.demo_out)
        return 0
    lanes = args.lanes.split(",")
    runs = {lane: {c: [] for c in CHOICES} for lane in lanes}
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "CIRLAB_ALLOCATOR_REEXEC")}
    for r in range(args.rounds):
        for lane in lanes:
            for choice in CHOICES:
                proc = subprocess.run([sys.executable, __file__, args.demo_out, "--child", lane], text=True,
                                      capture_output=True, env=env | {"CIRLAB_ALLOCATOR": choice,
                                                                      "HF_HUB_OFFLINE": "1"})
                if proc.returncode:
                    print(proc.stderr[-2000:], file=sys.stderr)
                    return 1
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                runs[lane][choice].append(row)
                print(f"round {r + 1} {lane} {choice} ({row['allocator']}): {row['ms_per_step']} ms/step", flush=True)
    summary = {}
    for lane, by in runs.items():
        med = {c: statistics.median(x["ms_per_step"] for x in by[c]) for c in CHOICES}
        summary[lane] = {"batch": LANES[lane][0], "threads": LANES[lane][1], "median_ms": med,
                         "speedup_vs_system": {c: round(med["system"] / med[c], 2) for c in CHOICES},
                         "runs": by}
        print(f"{lane}: " + ", ".join(f"{c} {med[c]:.1f} ms ({med['system'] / med[c]:.2f}x)" for c in CHOICES))
    if args.json:
        doc = {"command": "python bench/allocator.py " + " ".join(sys.argv[1:]), "rounds": args.rounds,
               "steps_timed": 15, "lanes": summary}
        with open(args.json, "w") as f:
            f.write(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
