"""Every demo method's training and evaluation on one device, a few steps each: the check to run first on a GPU.

    python bench/gpu_smoke.py [--device cuda] [--out /tmp/gpu_smoke] [--steps 4]

On the small synthetic world (written into OUT): CLIP and BLIP-2 pretraining, TMCIR's stage 1 (256 oracle
pseudo-targets, intent alignment), then each demo method trained `steps` steps from those backbones with
`TrainConfig(device=DEVICE)` (amp "auto": bf16 autocast on CUDA) and evaluated on test1 on the same device. One
line per job, `OK <job> <seconds> [R@10]` or `FAIL <job>: <error>` with the traceback's end; a failed job does not
stop the others (a failed backbone fails the jobs that start from it). Exit status 1 when any job failed. The
figures are no measure of quality (a few steps); the point is that every code path runs on the device.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path


def jobs(data: Path, ckpts: Path, cfg) -> list:
    """(name, function, checkpoint folder to evaluate or None) in order: the backbones and TMCIR's stage 1 first,
    since the methods start from them. `cfg(batch, **fields)` makes each job's TrainConfig."""
    from cirlab.editing.oracle import OracleEditor
    from cirlab.editing.run import edit_split
    from cirlab.training.intent_align import align_intent
    from cirlab.training.pretrain import pretrain
    from cirlab.training.train import train

    def stage1() -> None:
        edit_split("synth", data, "train", OracleEditor(data, imperfection=0.1, seed=0), ckpts / "pseudo", n=1,
                   progress=False, limit=256)
        align_intent(data, ckpts / "clip", ckpts / "pseudo", ckpts / "aligned", cfg(32), unfreeze="all")

    out = [("pretrain clip", lambda: pretrain("clip", data, ckpts / "clip", cfg(64),
                                              {"patch_size": 16, "width": 64, "layers": 2, "dim": 64}), None),
           ("pretrain blip2", lambda: pretrain("blip2", data, ckpts / "blip2", cfg(64),
                                               {"num_query_tokens": 4, "qformer_layers": 1}, init_from=ckpts / "clip"),
            None),
           ("tmcir stage 1", stage1, None)]
    for m in ["image_only", "sum", "text_only", "combiner", "tmcir", "csmcir"]:
        backbone = ckpts / {"csmcir": "blip2", "tmcir": "aligned"}.get(m, "clip")
        out.append((m, lambda m=m, b=backbone: train(m, data, b, ckpts / m,
                                                     cfg(16, group_by_reference=(m == "csmcir"))), ckpts / m))
    for m in ["mapcompose", "pic2word"]:
        out.append((m, lambda m=m: train(m, data, ckpts / "clip", ckpts / m, cfg(64), None,
                                         {"stage2": cfg(16), "triplets": 100 if m == "mapcompose" else 0}), ckpts / m))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="/tmp/gpu_smoke")
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()

    from cirlab.data.readers import read_split
    from cirlab.data.synth.generate import write_world
    from cirlab.evaluation.protocols import evaluate
    from cirlab.methods import load_model
    from cirlab.training.loop import TrainConfig

    data, ckpts = Path(args.out) / "data", Path(args.out) / "checkpoints"
    write_world(data, seed=0, size="small", progress=False)
    test = read_split("synth", data, "test1")

    def cfg(batch: int, **kw) -> TrainConfig:
        return TrainConfig(**({"epochs": 1, "batch_size": batch, "lr": 1e-3, "backbone_lr": 1e-4, "warmup_steps": 2,
                               "steps_per_epoch": args.steps, "progress": False, "seed": 0, "device": args.device}
                              | kw))

    failed = []
    for name, fn, folder in jobs(data, ckpts, cfg):
        t = time.time()
        try:
            fn()
            extra = ""
            if folder is not None:
                metrics, _ = evaluate(load_model(folder, args.device), test, progress=False)
                extra = f" R@10 {metrics['R@10']:.1f}"
            print(f"OK {name} {time.time() - t:.1f} s{extra}", flush=True)
        except Exception as e:  # every job runs; the failures are listed at the end
            failed.append(name)
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc(limit=-6)
    print(f"failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
