"""`cirlab ablate csmcir`: train CSMCIR and one-field variants of it on the synthetic world, one table.

Each row changes one design choice of the full method (symmetric target tower, MCoT final captions, entropy memory
bank): the asymmetric image-only target tower of SPRC-like methods, a single-level caption or none, and the memory
bank off or first-in-first-out. Every row starts from the method's config defaults (not the demo's variant) and
uses the default demo's BLIP-2 backbone (pretrained once, shared) and csmcir schedule on the default world, or
with `quick` on the small world (`_quick_profile`), and is evaluated on
val after each epoch (`epochs_to_best` is the epoch of the best val R@1, the training-efficiency figure) and on
test1 after the last epoch (`metrics`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

ROWS = {
    "csmcir": [
        {},
        {"target_tower": "image_only"},
        {"memory_bank": {"mode": "off"}},
        {"memory_bank": {"mode": "fifo"}},
        {"captions": "single_level"},
        {"captions": "none"},
    ],
}
FIELDS = {"csmcir": ("target_tower", "captions", "memory_bank")}


def _quick_profile():
    """The small world with the default demo's backbone sizes: the quick demo's narrower CLIP (2 epochs) left
    csmcir near chance (test1 R@1 0.0 to 2.5 in every row), too weak for rows to differ by more than noise."""
    from cirlab.demo import PROFILES, DemoProfile

    base = PROFILES["default"]
    return DemoProfile(
        world="small",
        backbones={"clip": base.backbones["clip"] | {"pretrain": base.backbones["clip"]["pretrain"] | {"epochs": 4}},
                   "blip2": base.backbones["blip2"] | {"pretrain": base.backbones["blip2"]["pretrain"] | {"epochs": 3}}},
        train=base.train, method_train=base.method_train, method_config=base.method_config)
COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1")


def _variant(method: str, change: dict) -> tuple:
    """(config for the run: the method's defaults with `change`, the ablated fields' values as the row shows them)."""
    from cirlab.methods import method_class

    full = method_class(method).config_class.from_json(change)
    shown = {}
    for f in FIELDS[method]:
        value = getattr(full, f)
        shown[f] = value.get("mode", "entropy") if isinstance(value, dict) else value
    return change, shown


def format_markdown(doc: dict) -> str:
    fields = FIELDS[doc["method"]]
    head = [*fields, *COLUMNS, "val R@1 per epoch", "epochs_to_best", "train_seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(fields) + "---:|" * (len(head) - len(fields))]
    for row in doc["rows"]:
        curve = " ".join(f"{v:.1f}" for v in row["val_curve"])
        lines.append("| " + " | ".join([*(str(row["variant"][f]) for f in fields),
                                        *(f"{row['metrics'][c]:.2f}" for c in COLUMNS),
                                        curve, str(row["epochs_to_best"]), f"{row['train_seconds']:.0f}"]) + " |")
    return "\n".join(lines) + "\n"


def _run_row(method: str, config: dict, data: Path, backbone: Path, folder: Path, cfg, val, test, stores) -> dict:
    """Train one row, evaluating val after each epoch; test1 after the last."""
    from cirlab.evaluation.protocols import evaluate
    from cirlab.methods import load_model
    from cirlab.training.train import train_method

    curve, eval_seconds = [], [0.0]

    def on_epoch(model, _folder):
        t = time.time()
        metrics, _ = evaluate(model, val, progress=False, store=stores["val"])
        curve.append(round(metrics["R@1"], 2))
        eval_seconds[0] += time.time() - t

    t = time.time()
    train_method(method, data, backbone, folder, cfg, config, on_epoch=on_epoch)
    train_seconds = time.time() - t - eval_seconds[0]
    metrics, _ = evaluate(load_model(folder), test, progress=False, store=stores["test"])
    best = max(range(len(curve)), key=lambda e: (curve[e], -e))
    return {"metrics": {k: round(v, 2) for k, v in metrics.items()}, "val_curve": curve,
            "epochs_to_best": best + 1, "train_seconds": round(train_seconds, 1)}


def _write(out: Path, doc: dict) -> str:
    tmp = out / "ablation.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(out / "ablation.json")
    table = format_markdown(doc)
    (out / "ablation.md").write_text(f"# Ablation of {doc['method']} (synthetic world: {doc['world']}, seed "
                                     f"{doc['seed']})\n\nTest1 metrics after the last epoch; val R@1 after each "
                                     f"epoch.\n\n{table}")
    return table


def run_ablation(method: str, out, quick: bool = False, seed: int = 0, progress: bool = True, profile=None,
                 rows: list | None = None, data=None) -> dict:
    """Train and evaluate each row; `profile`, `rows` and an existing world folder `data` override the defaults."""
    from cirlab.backbones import load_backbone
    from cirlab.data.images import PixelStore
    from cirlab.data.readers import read_split
    from cirlab.demo import PROFILES, ensure_backbone, ensure_world
    from cirlab.errors import CirlabError
    from cirlab.methods import method_class
    from cirlab.training.loop import TrainConfig

    if method not in ROWS:
        raise CirlabError(f"no ablation grid for {method!r}; grids exist for {', '.join(ROWS)}")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    profile = profile or (_quick_profile() if quick else PROFILES["default"])
    if data is None:
        data = out / "data"
        ensure_world(data, seed, profile.world, progress, log)
    data = Path(data)
    kind = method_class(method).backbone_kind
    backbone = ensure_backbone(kind, out / "checkpoints", data, profile, seed, progress, log)
    val, test = read_split("synth", data, "val"), read_split("synth", data, "test1")
    pre = load_backbone(kind, backbone).preprocess  # every row shares the backbone, so decoded images are shared
    stores = {"val": PixelStore(val.gallery, pre), "test": PixelStore(test.gallery, pre)}
    cfg = TrainConfig(seed=seed, progress=progress, **(profile.train | profile.method_train.get(method, {})))
    grid = ROWS[method] if rows is None else rows
    results = []
    for i, change in enumerate(grid):
        config, shown = _variant(method, change)
        log(f"row {i + 1}/{len(grid)}: {shown}")
        row = _run_row(method, config, data, backbone, out / "checkpoints" / f"{method}-{i}", cfg, val, test, stores)
        results.append({"variant": shown, "config": config, **row})
        log(f"  test1 R@1 {row['metrics']['R@1']:.2f}  R@10 {row['metrics']['R@10']:.2f}; val R@1 by epoch "
            f"{row['val_curve']}; {row['train_seconds']:.0f} s")
    doc = {"method": method, "world": profile.world, "seed": seed,
           "train": {k: v for k, v in vars(cfg).items() if k != "progress"},
           "rows": results, "seconds": round(time.time() - t0, 1)}
    table = _write(out, doc)
    print(table)
    log(f"done: {out / 'ablation.json'}, {out / 'ablation.md'}")
    return doc
