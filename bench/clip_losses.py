"""The default demo's first CLIP-pretraining losses on this machine, to see where two machines part.

    python bench/clip_losses.py DEMO_OUT [--steps 60] [--json FILE]
    python bench/clip_losses.py --from-log DEMO_LOG [--machine TEXT] [--steps 60] [--json FILE]

The first form replays the demo's CLIP pretraining (seed 0, the default profile's model, batch, order and schedule;
DEMO_OUT is a default demo's folder, for its world) for `--steps` steps in this process, with every core as the demo
has, and prints each step's loss to three decimals. The second reads the same losses from the progress bars of a
`make demo` log (which prints them to three decimals), made on the machine `--machine` names. With `--json`, the
losses and the machine (CPU, torch, MKL_CBWR) are added under a key naming the run ("this machine" or the log's file
name) to FILE, so runs from two machines sit side by side.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def replay(root: str, steps: int) -> list:
    import torch

    from cirlab import allocator
    from cirlab.data.readers import read_split
    from cirlab.experiments.profiles import PROFILES
    from cirlab.training.loop import TrainConfig, _optimizer, epoch_order
    from cirlab.training.pretrain import ContrastivePretrainer, backbone_and_pairs

    allocator.prepare()
    spec = PROFILES["full"].backbones["clip"]
    cfg = TrainConfig(seed=0, progress=False, **spec["pretrain"])
    split = read_split("synth", f"{root}/data", "train")
    torch.manual_seed(cfg.seed)  # as pretrain() does, then fit() for its first epoch
    backbone, source, _ = backbone_and_pairs("clip", split, spec["config"], None)
    model = ContrastivePretrainer(backbone)
    opt, sched = _optimizer(model, cfg, len(source) // cfg.batch_size * cfg.epochs)
    model.train()
    order = epoch_order(len(source), cfg.seed, 0)
    losses = []
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model.loss(source.batch(order[s * cfg.batch_size:(s + 1) * cfg.batch_size]))
        out.loss.backward()
        opt.step()
        sched.step()
        losses.append(round(out.loss.item(), 3))
    return losses


def from_log(path: str, steps: int) -> list:
    """The first epoch's per-step losses from tqdm's bars ("pretrain clip epoch 1/3: ... n/189 [...loss=x]"): a
    bar is drawn again after each step with that step's loss, so a new (count, loss) pair is a new step."""
    bars = re.findall(r"pretrain clip epoch 1/\d+:\s+\d+%\|[^|]*\|\s*(\d+)/\d+ \[[^\]]*loss=([\d.]+)\]",
                      Path(path).read_text(errors="replace"))
    losses, last = [], None
    for count, loss in bars:
        if loss != last:  # the same loss drawn again at a new count is the bar's refresh, not a step
            losses.append(float(loss))
        last = loss
    return losses[:steps]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("demo_out", nargs="?")
    ap.add_argument("--from-log")
    ap.add_argument("--machine", help="with --from-log: the machine the log was made on")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--json")
    args = ap.parse_args()
    if bool(args.demo_out) == bool(args.from_log):
        ap.error("give DEMO_OUT or --from-log, not both")
    if args.from_log:
        key, losses, where = Path(args.from_log).name, from_log(args.from_log, args.steps), args.machine
    else:
        from cirlab.experiments import machine

        where = machine.describe()
        key = "this machine" + (f", MKL_CBWR={where['mkl_cbwr']}" if where["mkl_cbwr"] else "")
        losses = replay(args.demo_out, args.steps)
    print(" ".join(f"{x:.3f}" for x in losses))
    if args.json:
        path = Path(args.json)
        doc = json.loads(path.read_text()) if path.exists() else {"what": __doc__.split("\n")[0], "runs": {}}
        doc["runs"][key] = {"machine": where, "losses": losses}
        runs = list(doc["runs"].values())
        doc["first_step_apart"] = {k: next((i + 1 for i, (a, b) in enumerate(zip(runs[0]["losses"], r["losses"]))
                                            if a != b), None) for k, r in doc["runs"].items()}
        path.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
