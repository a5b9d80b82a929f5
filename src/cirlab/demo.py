"""`cirlab demo`: the synthetic world end to end on a CPU.

Synthesise the world, pretrain the tiny CLIP backbone (reused when a backbone pretrained with the same seed and
config is already in the output folder), train every registered method that trains on the synthetic world, evaluate
every registered method on test1, and write results.json, report.md and a PNG grid of retrievals.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path


from cirlab.errors import CirlabError


@dataclass(frozen=True)
class DemoProfile:
    world: str
    backbones: dict  # kind -> {"config": tiny-config overrides, "pretrain": TrainConfig fields}
    train: dict  # TrainConfig fields shared by the trained methods
    method_train: dict = field(default_factory=dict)  # method -> TrainConfig overrides
    method_config: dict = field(default_factory=dict)  # method -> method config


PROFILES = {
    "default": DemoProfile(
        world="default",
        backbones={
            "clip": {"config": {"patch_size": 16, "width": 128, "layers": 4, "dim": 128},
                     "pretrain": {"epochs": 3, "batch_size": 128, "lr": 1e-3, "warmup_steps": 50}},
            "blip2": {"config": {},
                      "pretrain": {"epochs": 6, "batch_size": 128, "lr": 1e-3, "warmup_steps": 50}}},
        train={"epochs": 3, "batch_size": 64, "lr": 1e-3, "backbone_lr": 1e-4, "warmup_steps": 50},
        method_train={"csmcir": {"epochs": 5, "batch_size": 16, "group_by_reference": True, "backbone_lr": 2e-4}},
        method_config={"csmcir": {"memory_bank": {"mode": "off"}}}),
    "quick": DemoProfile(
        world="small",
        backbones={
            "clip": {"config": {"patch_size": 16, "width": 96, "layers": 3, "dim": 96},
                     "pretrain": {"epochs": 2, "batch_size": 128, "lr": 1e-3, "warmup_steps": 20}},
            "blip2": {"config": {"vision_width": 96, "vision_layers": 3, "qformer_width": 96, "dim": 96},
                      "pretrain": {"epochs": 4, "batch_size": 128, "lr": 1e-3, "warmup_steps": 20}}},
        train={"epochs": 2, "batch_size": 64, "lr": 1e-3, "backbone_lr": 1e-4, "warmup_steps": 20},
        method_train={"csmcir": {"epochs": 3, "batch_size": 16, "group_by_reference": True, "backbone_lr": 2e-4}},
        method_config={"csmcir": {"memory_bank": {"mode": "off"}}}),
}
METRIC_COLUMNS = ["R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"]


def ensure_world(data: Path, seed: int, size: str, progress: bool, log) -> None:
    from cirlab.data.synth.generate import write_world

    info = data / "synth" / "world.json"
    if info.exists():
        meta = json.loads(info.read_text())
        if meta.get("seed") == seed and meta.get("size") == size:
            log(f"world: reusing {data} (seed {seed}, size {size})")
            return
    log(f"world: writing {data} (seed {seed}, size {size})")
    write_world(data, seed=seed, size=size, progress=progress)


def ensure_backbone(kind: str, folder: Path, data: Path, spec: dict, seed: int, progress: bool, log) -> Path:
    """Pretrain the tiny `kind` backbone into `folder`, or reuse it when seed, config and world are unchanged."""
    from cirlab.training.loop import TrainConfig
    from cirlab.training.pretrain import DONE_FILE, pretrain

    cfg = TrainConfig(seed=seed, progress=progress, **spec["pretrain"])
    key = {"kind": kind, "train": dataclasses.asdict(cfg) | {"progress": None}, "overrides": spec["config"],
           "world": json.loads((data / "synth" / "world.json").read_text())}
    key_file = folder / "demo_key.json"
    if key_file.exists() and (folder / DONE_FILE).exists() and json.loads(key_file.read_text()) == key:
        log(f"backbone {kind}: reusing {folder}")
        return folder
    log(f"backbone {kind}: pretraining the tiny {kind} on (scene, caption) pairs ({cfg.epochs} epochs)")
    pretrain(kind, data, folder, cfg, spec["config"])
    key_file.write_text(json.dumps(key, indent=1))
    return folder


def run_demo(out, seed: int = 0, quick: bool = False, progress: bool = True, extra: tuple = ()) -> dict:
    """The demo; `extra` names registered methods to run besides those marked `in_demo`."""
    from cirlab.cli.main import format_table
    from cirlab.data.readers import read_split
    from cirlab.evaluation.protocols import checkpoint_identity, evaluate
    from cirlab.methods import REGISTRY, load_model
    from cirlab.training.loop import TrainConfig
    from cirlab.training.train import save_zero_shot, train_method

    t0 = time.time()
    profile = PROFILES["quick" if quick else "default"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    data, ckpts = out / "data", out / "checkpoints"
    results, timings = {}, {}
    ensure_world(data, seed, profile.world, progress, log)
    unknown = [n for n in extra if n not in REGISTRY]
    if unknown:
        raise CirlabError(f"unknown method(s) for --with: {', '.join(unknown)}; registered: {', '.join(REGISTRY)}")
    methods = sorted({n for n, c in REGISTRY.items() if c.in_demo} | set(extra))
    backbones = {}
    for kind in sorted({REGISTRY[n].backbone_kind for n in methods}):
        t = time.time()
        backbones[kind] = ensure_backbone(kind, ckpts / f"backbone-{kind}", data, profile.backbones[kind], seed,
                                          progress, log)
        timings[f"pretrain {kind}"] = round(time.time() - t, 1)
    test = read_split("synth", data, "test1")
    for name in methods:
        cls = REGISTRY[name]
        folder = ckpts / name
        backbone = backbones[cls.backbone_kind]
        t = time.time()
        if cls.trainable:
            cfg = TrainConfig(seed=seed, progress=progress, **(profile.train | profile.method_train.get(name, {})))
            log(f"{name}: training ({cfg.epochs} epochs)")
            train_method(name, data, backbone, folder, cfg, profile.method_config.get(name))
        else:
            save_zero_shot(name, backbone, folder, profile.method_config.get(name))
        model = load_model(folder)
        metrics, ranking = evaluate(model, test, cache_dir=folder / "cache", model_id=checkpoint_identity(folder),
                                    progress=progress)
        results[name] = {k: round(v, 2) for k, v in metrics.items()}
        timings[name] = round(time.time() - t, 1)
        log(f"{name}: R@1 {metrics['R@1']:.1f}  R@10 {metrics['R@10']:.1f}  ({timings[name]:.0f} s)")
        if name == _grid_method(REGISTRY):
            from cirlab.report import retrieval_grid

            retrieval_grid(test, ranking, out / "retrievals.png", title=name)
    wall = time.time() - t0
    table = format_table(results, METRIC_COLUMNS)
    print(table)
    doc = {"dataset": "synth", "split": "test1", "seed": seed, "methods": results,
           "method_config": {n: profile.method_config[n] for n in methods if n in profile.method_config}}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    from cirlab.report import write_report

    write_report(out / "report.md", table, doc, timings, wall, quick)
    log(f"done in {wall:.0f} s: {out / 'results.json'}, {out / 'report.md'}, {out / 'retrievals.png'}")
    return doc


def _grid_method(registry) -> str:
    trained = sorted(n for n, c in registry.items() if c.trainable)
    if not trained:
        raise CirlabError("no trainable method is registered")
    return "combiner" if "combiner" in trained else trained[0]
