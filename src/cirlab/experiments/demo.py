"""`cirlab demo`: the synthetic world end to end on a CPU.

Synthesise the world, pretrain the tiny CLIP backbone (reused when a backbone pretrained with the same seed and
config is already in the output folder), train every registered method that trains on the synthetic world, evaluate
every registered method on test1, and write results.json, report.md and a PNG grid of retrievals.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from pathlib import Path

from cirlab import allocator
from cirlab.experiments import machine
from cirlab.errors import CirlabError
from cirlab.experiments.profiles import (CLOSEST_BASELINE, PROFILES, QUICK_ZERO_SHOT,  # noqa: F401
                                         ZERO_SHOT, DemoProfile)

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
    write_world(data, seed=seed, size=size, progress=progress, workers=machine.cores())


def ensure_backbone(kind: str, ckpts: Path, data: Path, profile: DemoProfile, seed: int, progress: bool,
                    log, device: str = "cpu") -> Path:
    """Pretrain the tiny `kind` backbone into `ckpts/backbone-<kind>`, or reuse it when seed, config and world
    are unchanged. A spec with `init_from` (blip2 from clip) ensures that backbone first and starts from it."""
    from cirlab.training.loop import TrainConfig
    from cirlab.training.pretrain import DONE_FILE, pretrain

    spec = profile.backbones[kind]
    folder = ckpts / f"backbone-{kind}"
    cfg = TrainConfig(seed=seed, progress=progress, device=device, **spec["pretrain"])
    init = None
    key = {"kind": kind, "train": dataclasses.asdict(cfg) | {"progress": None}, "overrides": spec["config"],
           "world": json.loads((data / "synth" / "world.json").read_text())}
    if spec.get("init_from"):
        init = ensure_backbone(spec["init_from"], ckpts, data, profile, seed, progress, log, device)
        key["init_from"] = json.loads((init / "demo_key.json").read_text())
    key_file = folder / "demo_key.json"
    if key_file.exists() and (folder / DONE_FILE).exists() and json.loads(key_file.read_text()) == key:
        log(f"backbone {kind}: reusing {folder}")
        return folder
    if init is not None:
        log(f"backbone {kind}: the {spec['init_from']} ViT, frozen, under a Q-Former trained on (scene, caption) "
            f"pairs ({cfg.epochs} epochs)")
    else:
        log(f"backbone {kind}: pretraining the tiny {kind} on (scene, caption) pairs ({cfg.epochs} epochs)")
    pretrain(kind, data, folder, cfg, spec["config"], init_from=init)
    key_file.write_text(json.dumps(key, indent=1))
    return folder


def ensure_intent_backbone(clip: Path, folder: Path, data: Path, spec: dict, seed: int, progress: bool,
                           log, device: str = "cpu") -> Path:
    """TMCIR's stage 1 on the synthetic world: the oracle editor's pseudo-targets into `folder/pseudo`, then
    intent alignment of the CLIP at `clip` into `folder/clip`, which is returned. A finished folder with the same
    CLIP, spec and seed is reused; an unfinished one with the same key resumes (both steps are resumable); any
    other is replaced."""
    import shutil

    from cirlab.editing.oracle import OracleEditor
    from cirlab.editing.run import edit_split
    from cirlab.training.intent_align import DONE_FILE, align_intent
    from cirlab.training.loop import TrainConfig

    key = {"clip": json.loads((clip / "demo_key.json").read_text()), "spec": spec, "seed": seed}
    key_file, aligned = folder / "demo_key.json", folder / "clip"
    same = key_file.exists() and json.loads(key_file.read_text()) == key
    if same and (aligned / DONE_FILE).exists():
        log(f"stage 1: reusing {aligned}")
        return aligned
    if folder.exists() and not same:
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key_file.write_text(json.dumps(key, indent=1))
    t = time.time()
    editor = OracleEditor(data, imperfection=spec["imperfection"], seed=seed, failures=spec.get("failures"))
    stats = edit_split("synth", data, "train", editor, folder / "pseudo", n=spec["n"], progress=progress,
                       limit=spec.get("limit"))
    cfg = TrainConfig(seed=seed, progress=progress, device=device, **spec["train"])
    log(f"stage 1: {stats.images} oracle pseudo-targets (imperfection {spec['imperfection']}, {stats.made} made "
        f"now) in {time.time() - t:.0f} s; intent alignment ({cfg.epochs} epoch(s), unfreeze {spec['unfreeze']})")
    align_intent(data, clip, folder / "pseudo", aligned, cfg, unfreeze=spec["unfreeze"], resume=same)
    return aligned


def shared_backbones(methods: list, registry, profile: DemoProfile) -> list:
    """The backbone kinds other kinds start from (CLIP, under BLIP-2's Q-Former): pretrained before the lanes."""
    kinds = {registry[n].backbone_kind for n in methods}
    return sorted({profile.backbones[k].get("init_from") for k in kinds} - {None})


def _lanes(methods: list, registry, profile: DemoProfile) -> list:
    """The lanes the workers run, each {"name", "kind", "methods", "after": the names of lanes it waits for,
    optional "stage1"}: a method with a stage 1 of its own (tmcir: pseudo-targets, intent alignment, stage 2) is one
    lane; a backbone pretrained inside the lanes (BLIP-2's Q-Former, on CLIP's ViT) is a lane of its own that the
    methods on it wait for; every other method is a lane. In structural order (stage-1 lanes, backbones, then the
    methods trained on triplets, the zero-shot ones, those with no training); `_order` decides the running order.
    """
    from cirlab.methods import TrainingKind

    shared = set(shared_backbones(methods, registry, profile))
    own = sorted({registry[n].backbone_kind for n in methods} - shared)

    def lane(n: str, **extra) -> dict:
        kind = registry[n].backbone_kind
        return {"name": n, "kind": kind, "methods": [n], "after": [f"pretrain {kind}"] if kind in own else [],
                **extra}

    order = (TrainingKind.TRIPLETS, TrainingKind.ZERO_SHOT)
    rest = sorted((n for n in methods if n not in profile.stage1),
                  key=lambda n: order.index(registry[n].training) if registry[n].training in order else len(order))
    return ([lane(n, stage1=n) for n in methods if n in profile.stage1]
            + [{"name": f"pretrain {k}", "kind": k, "methods": [], "after": []} for k in own]
            + [lane(n) for n in rest])


def _first_ready(pending: list, done) -> dict | None:
    """The first pending lane whose `after` lanes have all ended, or None."""
    return next((lane for lane in pending if all(a in done for a in lane["after"])), None)


def _simulated_wall(order: list, workers: int, cost: dict) -> float:
    """The wall time of running `order` as the workers do (each free worker takes the first ready lane), with
    each lane taking `cost[name]` seconds."""
    pending, running, done, now = list(order), [], set(), 0.0
    while pending or running:
        while len(running) < workers and (lane := _first_ready(pending, done)) is not None:
            pending.remove(lane)
            running.append((now + cost[lane["name"]], lane["name"]))
        running.sort()
        now, name = running.pop(0)
        done.add(name)
    return now


def _order(lanes: list, workers: int, seconds: dict) -> list:
    """The lanes in the order the workers take them: the order whose simulated wall time (`_simulated_wall`) is
    least, found by swapping pairs, starting from the longest first, while a swap shortens it. A lane's cost is the
    sum of its steps' estimated seconds (the profile's `seconds`, measured in a demo); a step with no estimate
    counts as the longest estimated one (unknown work starts early), and with no estimates every lane counts the
    same. The order only decides when lanes run, never what they compute."""
    import itertools

    longest = max(seconds.values(), default=1.0)

    def steps(lane: dict) -> list:
        if not lane["methods"]:
            return [lane["name"]]
        return ([f"stage 1 {lane['stage1']}"] if "stage1" in lane else []) + lane["methods"]

    cost = {lane["name"]: sum(seconds.get(step, longest) for step in steps(lane)) for lane in lanes}
    best = sorted(lanes, key=lambda lane: -cost[lane["name"]])
    wall, improved = _simulated_wall(best, workers, cost), True
    while improved:
        improved = False
        for i, j in itertools.combinations(range(len(best)), 2):
            trial = list(best)
            trial[i], trial[j] = trial[j], trial[i]
            if (w := _simulated_wall(trial, workers, cost)) < wall - 1e-9:
                best, wall, improved = trial, w, True
    return best


def _run_lane(lane: dict, out: Path, seed: int, profile_name: str, progress: bool, t0: float, threads: int,
              grid: str, device: str = "cpu") -> dict:
    """Ensure the lane's backbone, then train (or save) and evaluate each of its methods on test1.

    Runs in the demo's process or in a worker process (then `threads` sets torch's intra-op threads).
    """
    import torch

    from cirlab.data.readers import read_split
    from cirlab.evaluation.per_query import write_records

    cpu0 = cpu_seconds()
    malloc = allocator.prepare()
    if threads:
        torch.set_num_threads(threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    profile = PROFILES[profile_name]

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    data, ckpts = out / "data", out / "checkpoints"
    results, timings = {}, {}
    t = time.time()
    backbone = ensure_backbone(lane["kind"], ckpts, data, profile, seed, progress, log, device)
    timings[f"pretrain {lane['kind']}"] = round(time.time() - t, 1)
    if lane.get("stage1"):
        t = time.time()
        name = lane["stage1"]
        backbone = ensure_intent_backbone(backbone, ckpts / f"{name}-stage1", data, profile.stage1[name], seed,
                                          progress, log, device)
        timings[f"stage 1 {name}"] = round(time.time() - t, 1)
    if lane["methods"]:
        test = read_split("synth", data, "test1")
        queries = [q for q in test.queries if q.targets]
    for name in lane["methods"]:
        t = time.time()
        metrics, ranking = _train_and_evaluate(name, data, backbone, ckpts / name, profile, seed, progress, test,
                                               log, device)
        write_records(out / "per_query" / f"{name}.jsonl", ranking.records(queries))
        results[name] = {k: round(v, 2) for k, v in metrics.items()}
        timings[name] = round(time.time() - t, 1)
        log(f"{name}: R@1 {metrics['R@1']:.1f}  R@10 {metrics['R@10']:.1f}  ({timings[name]:.0f} s)")
        if name == grid:
            from cirlab.experiments.report import retrieval_grid

            retrieval_grid(test, ranking, out / "retrievals.png", title=name)
    return {"results": results, "timings": timings, "allocator": malloc, "cpu": round(cpu_seconds() - cpu0, 1)}


def _train_and_evaluate(name: str, data: Path, backbone: Path, folder: Path, profile: DemoProfile, seed: int,
                        progress: bool, test, log, device: str = "cpu") -> tuple:
    """Train `name` on the world's train split with the profile's schedule (or save it, if zero-shot), then
    evaluate it on test1: (metrics, ranking)."""
    from cirlab.evaluation.protocols import evaluate
    from cirlab.methods import REGISTRY, TrainingKind, checkpoint_identity, load_model
    from cirlab.training.loop import TrainConfig
    from cirlab.training.train import train

    kind, config = REGISTRY[name].training, profile.method_config.get(name)
    common = {"seed": seed, "progress": progress, "device": device}
    cfg = TrainConfig(**common, **(profile.train | profile.method_train.get(name, {})))
    if kind is TrainingKind.ZERO_SHOT:
        spec = profile.zero_shot[name]
        train(name, data, backbone, folder, TrainConfig(**common, **spec["stage1"]), config,
              {"stage2": TrainConfig(**common, **spec["stage2"]), "triplets": spec["triplets"],
               "seed": seed, "log": log})
    elif kind is TrainingKind.TRIPLETS:
        log(f"{name}: training ({cfg.epochs} epochs)")
        done = []

        def on_epoch(_model, _out):
            done.append(1)
            log(f"{name}: epoch {len(done)}/{cfg.epochs} done")

        train(name, data, backbone, folder, cfg, config, on_epoch=on_epoch)
    else:
        train(name, data, backbone, folder, cfg, config)
    return evaluate(load_model(folder, device), test, cache_dir=folder / "cache",
                    model_id=checkpoint_identity(folder), progress=progress)


def cpu_seconds() -> float:
    """User and system CPU time of this process so far, all its threads together."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_record(before_lanes: float, lanes: list, done: list, wall: float, cores: int) -> dict:
    """Where the cores' time went: the CPU seconds before the lanes (world, shared backbones), each lane's, and
    their sum as a share of wall time x cores."""
    per_lane = {lane["name"]: ran["cpu"] for lane, ran in zip(lanes, done)}
    total = before_lanes + sum(per_lane.values())
    return {"before_lanes": round(before_lanes, 1), "lanes": per_lane, "total": round(total, 1), "cores": cores,
            "busy_pct": round(100 * total / (wall * cores), 1)}


def _die_with_parent() -> None:
    """Worker initialiser: on Linux, ask the kernel to kill this worker when the demo process dies, so a
    killed or interrupted demo leaves no lane training on in the background."""
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


def check_device(device: str) -> None:
    """Refuse, in one line, a device this machine's torch cannot train on."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CirlabError(f"--device {device}: this torch sees no CUDA device (torch {torch.__version__}); "
                          "use --device cpu")
    if not (device == "cpu" or device.startswith("cuda")):
        raise CirlabError(f"--device {device}: the demo trains on cpu or cuda")


def run_demo(out, seed: int = 0, profile_name: str = "default", progress: bool = True, extra: tuple = (),
             workers: int | None = None, device: str = "cpu") -> dict:
    """The demo; `extra` names registered methods to run besides the profile's `methods`.

    After the world and the backbones other backbones start from (CLIP), the methods run in lanes (`_lanes`), in
    `workers` processes side by side (default: one per core, at most one per lane; each gets cores // workers
    threads, at least one), each taking the next ready lane in `_order`'s order when its own ends. The tiny
    models' small matrix products keep two cores only 1.2-1.7x busier than one (measured on combiner and CLIP
    pretraining steps), while two one-thread processes run at twice one's rate, so one-thread lanes side by side
    finish sooner than the same work on two threads in turn; and two processes on one core each spent 8.6% more CPU
    time a combiner step than one alone (one thread, batch 64: 268 against 247 ms; each evicts the other's data from
    the core's caches), so on 2 cores two workers beat one per lane. Each lane's figures depend on its thread count
    only through float summation order: with the same threads per lane on the same machine a run repeats exactly,
    however many workers and in whatever order.
    """
    speed = {"before": machine.core_gflops()}  # the host's speed, outside the timed run
    t0 = time.time()
    if profile_name not in PROFILES:
        raise CirlabError(f"unknown demo profile {profile_name!r}; choose one of {', '.join(PROFILES)}")
    profile = PROFILES[profile_name]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    check_device(device)
    malloc = {"main": allocator.prepare()}
    data = out / "data"
    ensure_world(data, seed, profile.world, progress, log)
    with pixel_caches(data, out / "cache" / "pixels", log):
        return _run_after_world(out, data, seed, profile_name, profile, progress, extra, workers, device, t0, log,
                                speed, malloc)


@contextlib.contextmanager
def pixel_caches(data: Path, root: Path, log):
    """Decode the train and test1 galleries once (data/pixel_cache.py, one process per core) and point
    `CIRLAB_PIXEL_CACHE` at them for this process and the lanes it starts; the variable is restored after."""
    from cirlab.data import pixel_cache
    from cirlab.data.decode import decode_uint8
    from cirlab.data.readers import read_split
    from cirlab.data.spawn import spawn_pool

    size = json.loads((data / "synth" / "world.json").read_text())["image_size"]
    t, n = time.time(), 0
    with spawn_pool(machine.cores()) as pool:
        for split in ("train", "test1"):
            gallery = read_split("synth", data, split).gallery
            pixel_cache.build(gallery, size, root, decode_uint8, pool=pool)
            n += len(gallery)
    log(f"pixels: {n} images decoded once into {root} ({time.time() - t:.1f} s)")
    before = os.environ.get(pixel_cache.ENV)
    os.environ[pixel_cache.ENV] = str(root.resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(pixel_cache.ENV, None)
        else:
            os.environ[pixel_cache.ENV] = before


def _run_after_world(out: Path, data: Path, seed: int, profile_name: str, profile: DemoProfile, progress: bool,
                     extra: tuple, workers: int | None, device: str, t0: float, log, speed: dict,
                     malloc: dict) -> dict:
    """The demo from its backbones on: pretraining, the lanes, the results."""
    from cirlab.methods import REGISTRY

    ckpts = out / "checkpoints"
    methods = _methods(profile, extra, REGISTRY)
    lanes = _lanes(methods, REGISTRY, profile)
    timings = {}
    for kind in shared_backbones(methods, REGISTRY, profile):  # pretrained first, with every core
        t = time.time()
        ensure_backbone(kind, ckpts, data, profile, seed, progress, log, device)
        timings[f"pretrain {kind}"] = round(time.time() - t, 1)
    cores, before_lanes = machine.cores(), cpu_seconds()
    workers = max(1, min(workers or cores, len(lanes)))
    lanes, grid = _order(lanes, workers, profile.seconds), _grid_method(REGISTRY)
    threads = max(1, cores // workers) if workers > 1 else 0
    log(f"{len(lanes)} lanes ({', '.join(lane['name'] for lane in lanes)}) in {workers} process(es), "
        f"{threads or cores} thread(s) each")
    done = _run_lanes(lanes, workers, (out, seed, profile_name, progress and workers == 1, t0, threads, grid, device))
    results, malloc["lanes"] = _merge_lanes(done, methods, timings)
    wall = time.time() - t0
    speed["after"] = machine.core_gflops()
    seconds = {"wall": round(wall, 1), "workers": workers, "steps": timings, "allocator": malloc,
               "cpu": _cpu_record(before_lanes, lanes, done, wall, cores), "core_gflops": speed}
    doc = _write_results(out, methods, results, profile_name, seed, seconds, device)
    log(f"done in {wall:.0f} s: {out / 'results.json'}, {out / 'report.md'}, {out / 'retrievals.png'}")
    return doc


def _methods(profile: DemoProfile, extra: tuple, registry) -> list:
    """The profile's methods and those named by --with, sorted; an unregistered name is refused."""
    unknown = [n for n in extra if n not in registry]
    if unknown:
        raise CirlabError(f"unknown method(s) for --with: {', '.join(unknown)}; registered: {', '.join(registry)}")
    return sorted(set(profile.methods) | set(extra))


def _merge_lanes(done: list, methods: list, timings: dict) -> tuple[dict, list]:
    """The finished lanes' results in `methods` order and the allocators they ran under; adds their step times
    to `timings`."""
    results = {}
    for lane in done:
        results.update(lane["results"])
        for k, v in lane["timings"].items():
            timings[k] = timings.get(k, 0.0) + v
    return {n: results[n] for n in methods}, sorted({lane["allocator"] for lane in done})


def _write_results(out: Path, methods: list, results: dict, profile_name: str, seed: int, seconds: dict,
                   device: str = "cpu") -> dict:
    """Print the table, then write results.json (figures, variants, per-query files, intervals against the
    closest baselines, settings, seconds) and report.md; returns the results document."""
    from cirlab.experiments.report import format_table, write_report
    from cirlab.methods import REGISTRY

    profile = PROFILES[profile_name]
    names = {n: variant_name(n, REGISTRY[n], profile) for n in methods}
    table = format_table({names[n]: results[n] for n in methods}, METRIC_COLUMNS)
    print(table)
    doc = {"dataset": "synth", "split": "test1", "profile": profile_name, "seed": seed, "device": device,
           "methods": results, "variants": names,
           "per_query": {n: f"per_query/{n}.jsonl" for n in methods},
           "versus_closest_baseline": closest_intervals(out / "per_query", methods, profile.closest),
           "method_config": {n: profile.method_config[n] for n in methods if n in profile.method_config},
           "stage1": {n: profile.stage1[n] for n in methods if n in profile.stage1}, "seconds": seconds,
           "machine": machine.describe()}
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_report(out / "report.md", table, doc, seconds["steps"], seconds["wall"], seconds["workers"])
    return doc


def config_changes(defaults, chosen, prefix: str = "") -> list:
    """"field=value" for each field (dict fields by their keys, dotted) where `chosen` differs from `defaults`."""
    out = []
    for k in chosen:
        a, b = defaults.get(k) if isinstance(defaults, dict) else None, chosen[k]
        if isinstance(b, dict) and isinstance(a, dict):
            out += config_changes(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}={b}")
    return out


def variant_name(name: str, cls, profile: DemoProfile) -> str:
    """The method's name with what the demo runs differently from its defaults, e.g. `csmcir
    (memory_bank.mode=off)`; zero-shot methods say so, a stage 1 names its editor setting."""
    from cirlab.methods import TrainingKind

    notes = []
    if name in profile.method_config:
        cfg = cls.config_class.from_json(profile.method_config[name])
        notes += config_changes(cls.config_class().to_json(), cfg.to_json())
    if name in profile.stage1:
        notes.append(f"oracle stage 1, imperfection {profile.stage1[name]['imperfection']}")
    if cls.training is TrainingKind.ZERO_SHOT:
        notes.append("zero-shot")
    return f"{name} ({', '.join(notes)})" if notes else name


def closest_intervals(per_query: Path, methods: list, closest: dict, metric: str = "R@1") -> dict:
    """For each seed method in `methods` whose baseline ran too: its `metric` minus the baseline's, with the
    95% paired bootstrap interval over queries."""
    from cirlab.evaluation.compare import compare_files

    out = {}
    for name, base in closest.items():
        if name in methods and base in methods:
            r = compare_files([per_query / f"{base}.jsonl"], [per_query / f"{name}.jsonl"], [metric])[metric]
            out[name] = {"baseline": base, "metric": metric, "method": round(r["b"], 2),
                         "baseline_value": round(r["a"], 2), "diff": round(r["diff"], 2),
                         "ci": [round(x, 2) for x in r["ci"]]}
    return out


def _run_lanes(lanes: list, workers: int, args: tuple) -> list:
    """`_run_lane(lane, *args)` for each lane, the results in `lanes` order: each free worker takes the first
    lane in `lanes` whose `after` lanes have ended. One worker runs them in this process; more are a pool of
    spawned processes that die with this one, where a failed lane or Ctrl-C stops the others too, then the error
    is raised."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from cirlab.data.spawn import spawn_pool

    pending, done = list(lanes), {}
    if workers == 1:
        while (lane := _first_ready(pending, done)) is not None:
            pending.remove(lane)
            done[lane["name"]] = _run_lane(lane, *args)
        return [done[lane["name"]] for lane in lanes]
    pool = spawn_pool(workers, initializer=_die_with_parent)
    running = {}
    try:
        with allocator.for_children():  # the pool spawns a worker at each submit
            while pending or running:
                while len(running) < workers and (lane := _first_ready(pending, done)) is not None:
                    pending.remove(lane)
                    running[pool.submit(_run_lane, lane, *args)] = lane["name"]
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    done[running.pop(future)] = future.result()
    except BaseException:
        for proc in list(getattr(pool, "_processes", {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return [done[lane["name"]] for lane in lanes]


def _grid_method(registry) -> str:
    from cirlab.methods import TrainingKind

    trained = sorted(n for n, c in registry.items() if c.training is not TrainingKind.NONE)
    if not trained:
        raise CirlabError("no trainable method is registered")
    return "combiner" if "combiner" in trained else trained[0]
