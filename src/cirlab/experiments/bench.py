"""`cirlab bench --out DIR [--quick]`: throughput and memory per method, csmcir's memory-bank overhead and the
frozen-feature cache's speedup, on the synthetic world; writes `DIR/bench.json` and `DIR/bench.md`.

Per method (`methods`), each measured in a fresh process so that its peak resident memory is its own:
- `train_samples_per_s`: triplets (zero-shot methods: stage I's image-caption pairs) per second through forward,
  backward and an AdamW step, after warm-up steps; frozen image stages pre-computed in memory, as training does;
- `eval_images_per_s`: gallery images per second through `encode_target` (decoded and resized beforehand);
- `peak_rss_mb`: the process's peak resident memory;
- `index_build`: images per second through `cirlab index build`'s code (sum on the bench's CLIP) in one process
  and with Ray at 2 actors;
- `train_gflops`: the training step's floating-point work (forward and backward, counted once by torch's
  FlopCounterMode: matrix products and convolutions, 2 FLOPs a multiply-add; the optimizer and element-wise work are
  not counted) times steps per second, in GFLOP/s, and `of_peak_pct` that over the machine's measured peak.
The machine's `peak_gflops`: fp32 matrix products of 2048 x 2048 on every thread torch uses, the best of five timed
runs: what the cores can do on the kernel training spends its time in.
csmcir's `bank_overhead_pct`: step time with the entropy memory bank (full) over the step without, minus one, in
percent: the median over seven rounds that time both, in alternating order (`bank_overhead_pct_rounds`); and
`bank_share_pct`, the time spent inside the bank's calls over the rest of the same steps (drift-free, see
_bank_share).
`cache_speedup`: csmcir's training samples per second with the frozen ViT's outputs read from the on-disk cache
(training/feature_cache.py) over recomputing the ViT every step, on a BLIP-2 whose frozen ViT has about five times
the Q-Former's parameters (BLIP-2 ViT-g: 1.0 B against 0.19 B). Backbones are built from configs with random
weights: speed does not depend on them. On a GPU (`--device cuda`) the same figures are taken there.
"""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from cirlab import allocator
from cirlab.experiments import machine
from cirlab.experiments.machine import matmul_peak_gflops

SIZES = {"quick": {"steps": 20, "warmup": 3, "batch": 32, "eval_images": 512, "index_images": 1024},
         "full": {"steps": 50, "warmup": 5, "batch": 64, "eval_images": 2048, "index_images": 4096}}
CLIP = {"patch_size": 16, "width": 128, "layers": 4, "dim": 128}
BLIP2 = {"vision_width": 128, "vision_layers": 4, "qformer_width": 128, "qformer_layers": 2, "dim": 128}
# the cache-speedup backbone: a ViT of 12 layers of width 256 (9.7 M parameters) against a Q-Former of 2 layers of
# width 36 whose 49,408-word table dominates (1.9 M): 5.2 to 1, as ViT-g (1.0 B) to BLIP-2's Q-Former (0.19 B)
BIG_VIT = {"vision_width": 256, "vision_layers": 12, "qformer_width": 36, "qformer_layers": 2, "dim": 128}


def _model(name: str, spec: dict, config: dict | None, device: str):
    """Method `name` on a tiny backbone built from `spec` with seed 0, the whole model (heads too) on `device`."""
    from cirlab.backbones import tiny_backbone
    from cirlab.methods import build_model, method_class

    kind = method_class(name).backbone_kind
    torch.manual_seed(0)
    bb = tiny_backbone(kind, **spec)
    if kind == "blip2":
        bb.model.vision_model.requires_grad_(False)  # csmcir's default: the ViT is frozen
    return build_model(name, bb, config).to(device)


def _source(model, data, zero_shot: bool):
    from cirlab.data.images import PixelStore
    from cirlab.training.data import FrozenFeatureStore, PairSource, TripletSource

    store = PixelStore(data.gallery, model.preprocess)
    frozen = model.frozen_image_stage()
    if frozen is not None:
        store = FrozenFeatureStore(store, frozen)
    if zero_shot:
        names = sorted(n for n in data.gallery if n in data.captions)
        return PairSource(names, data.captions, store)
    return TripletSource(data, store, model.target_captions)


def step_flops(model, source, size: dict, device: str) -> int:
    """FLOPs of one training step's forward and backward on a batch of `batch` (FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = source.batch(list(range(size["batch"]))).to(device)
    counter = FlopCounterMode(display=False)
    with counter:
        model.loss(batch).loss.backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def _steps_per_s(model, source, size: dict, device: str) -> float:
    """Seconds per step over `steps` steps after `warmup`, as samples per second."""
    from cirlab.training.loop import TrainConfig, _optimizer

    opt, _ = _optimizer(model, TrainConfig(lr=1e-4), 1000)
    model.train()
    b = size["batch"]
    batches = [source.batch(list(range(i * b, (i + 1) * b))) for i in range(size["warmup"] + size["steps"])]
    for n, batch in enumerate(batches):
        if n == size["warmup"]:
            t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model.loss(batch.to(device)).loss.backward()
        opt.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return size["steps"] * b / (time.perf_counter() - t)


def measure_method(name: str, data_root: str, size: dict, device: str = "cpu") -> dict:
    """One method's row (run it in a process of its own for a meaningful peak_rss_mb)."""
    from cirlab.data.images import PixelStore
    from cirlab.data.readers import read_split
    from cirlab.methods import TrainingKind, method_class

    cls = method_class(name)
    spec = CLIP if cls.backbone_kind == "clip" else BLIP2
    zero_shot = cls.training is TrainingKind.ZERO_SHOT
    config = {"stage": "mapping"} if zero_shot else None
    model = _model(name, spec, config, device)
    data = read_split("synth", data_root, "train")
    row = {"train_samples_per_s": None, "train_gflops": None}
    if cls.training is not TrainingKind.NONE:
        source = _source(model, data, zero_shot)
        rate = _steps_per_s(model, source, size, device)
        flops = step_flops(model, source, size, device)
        row["train_samples_per_s"] = round(rate, 1)
        row["train_gflops"] = round(flops * rate / size["batch"] / 1e9, 2)
        row["step_gflop"] = round(flops / 1e9, 3)
    test = read_split("synth", data_root, "test1")
    names = sorted(test.gallery)[:size["eval_images"]]
    pixels = PixelStore(test.gallery, model.preprocess)
    px = pixels.pixels(names)
    caps = test.caption_texts(names, model.target_captions) if model.target_captions else None
    model.eval()
    with torch.no_grad():
        model.encode_target(px[:8].to(device), caps[:8] if caps else None)  # warm-up
        t = time.perf_counter()
        for lo in range(0, len(names), 64):
            model.encode_target(px[lo:lo + 64].to(device), caps[lo:lo + 64] if caps else None)
    row["eval_images_per_s"] = round(len(names) / (time.perf_counter() - t), 1)
    row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return row


def bank_overhead(data_root: str, size: dict, device: str = "cpu", rounds: int = 7) -> dict:
    """csmcir steps per second with the entropy memory bank, full, handing out negatives, against the same model
    with the bank switched off: one model (its bank filled first), timed in `rounds` rounds of one timing of each,
    the order alternating between rounds. The overhead is the median over rounds of the round's off/on rate ratio,
    minus one: a paired estimate, robust to a machine whose speed drifts or a neighbour that takes a core for a
    while. Two separately built models differ by more than the bank costs on a 2-core machine (measured: one
    instance ran 10-20% slower than another in every round, either way), hence one model. Samples/s reported:
    each mode's best round."""
    import dataclasses
    import statistics

    from cirlab.data.readers import read_split

    data = read_split("synth", data_root, "train")
    bank = {"mode": "entropy", "warmup_steps": 0, "num_negatives": 64}
    if "bank_capacity" in size:  # tests shrink the bank; the benchmark keeps csmcir's default capacity
        bank["capacity"] = size["bank_capacity"]
    model = _model("csmcir", BLIP2, {"memory_bank": bank}, device)
    source = _source(model, data, False)
    with torch.no_grad():  # fill the bank first: the overhead of a full bank is the one that lasts
        for i in range(model.bank.config.capacity // size["batch"] + 1):
            model.loss(source.batch(list(range(i * size["batch"], (i + 1) * size["batch"]))).to(device))
    on = model.bank.config
    modes = {"entropy": on, "off": dataclasses.replace(on, mode="off")}  # off: no negatives, nothing stored
    ratios, best = [], {mode: 0.0 for mode in modes}
    for r in range(rounds):
        rate = {}
        for mode in (("off", "entropy") if r % 2 == 0 else ("entropy", "off")):
            model.bank.config = modes[mode]
            rate[mode] = _steps_per_s(model, source, size, device)
            best[mode] = max(best[mode], rate[mode])
        ratios.append(rate["off"] / rate["entropy"])
    model.bank.config = on
    return {"bank_overhead_pct": round(100 * (statistics.median(ratios) - 1), 1),
            "bank_overhead_pct_rounds": [round(100 * (x - 1), 1) for x in ratios],
            "bank_share_pct": _bank_share(model, source, size, device),
            "train_samples_per_s_bank_off": round(best["off"], 1),
            "train_samples_per_s_bank_entropy": round(best["entropy"], 1)}


def _bank_share(model, source, size: dict, device: str) -> float:
    """Percent of a step's time, besides the bank, spent inside the bank's calls (choosing the negatives, storing
    the batch), timed in the same steps: a drift-free reading of the bank's cost, which leaves out the negatives'
    logits and their backward (a (B, n, K, D) product, small next to the Q-Former)."""
    bank, spent = model.bank, [0.0]

    def timed(fn):
        def run(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[0] += time.perf_counter() - t
            return out
        return run

    bank.negatives, bank.push = timed(bank.negatives), timed(bank.push)
    try:
        steps = size["warmup"] + size["steps"]
        t = time.perf_counter()
        _steps_per_s(model, source, size | {"warmup": 0, "steps": steps}, device)
        total = time.perf_counter() - t
    finally:
        del bank.negatives, bank.push  # the class's methods again
    return round(100 * spent[0] / (total - spent[0]), 1)


def cache_speedup(data_root: str, cache_dir: str, size: dict, device: str = "cpu") -> dict:
    """csmcir on the big-ViT BLIP-2: samples per second recomputing the frozen ViT every step against reading its
    outputs from the on-disk feature cache."""
    from cirlab.data.images import PixelStore
    from cirlab.data.readers import read_split
    from cirlab.training.data import FrozenFeatureStore, TripletSource, frozen_feature_cache

    data = read_split("synth", data_root, "train")
    model = _model("csmcir", BIG_VIT, {"memory_bank": {"mode": "off"}}, device)
    vit = sum(p.numel() for p in model.backbone.model.vision_model.parameters())
    qformer = sum(p.numel() for n, p in model.backbone.model.named_parameters() if not n.startswith("vision_model"))
    pixels = PixelStore(data.gallery, model.preprocess)
    uncached = _steps_per_s(model, TripletSource(data, pixels, model.target_captions), size, device)
    cache = frozen_feature_cache(model, cache_dir)
    store = FrozenFeatureStore(pixels, model.frozen_image_stage(), cache=cache)
    b = size["batch"]
    store.fill([n for q in data.queries[:(size["warmup"] + size["steps"]) * b] for n in (q.reference, q.targets[0])])
    cached = _steps_per_s(model, TripletSource(data, store, model.target_captions), size, device)
    return {"cache_speedup": round(cached / uncached, 2), "train_samples_per_s_uncached": round(uncached, 1),
            "train_samples_per_s_cached": round(cached, 1), "vision_params_m": round(vit / 1e6, 2),
            "qformer_params_m": round(qformer / 1e6, 2), "vision_to_qformer": round(vit / qformer, 2)}


def index_build_throughput(data_root: str, out: str, images: int, actors: int = 2, ray: bool = True) -> dict:
    """Images per second through `build_index` (decode, preprocess, `encode_target`, write the index) for the
    `sum` method on the bench's CLIP: in this process, and with the Ray engine at `actors` actors (Ray started
    before the clock, its actors' start-up inside it: what a user's build pays). Without Ray, that figure is None."""
    import shutil

    from cirlab.backbones import tiny_backbone
    from cirlab.data.readers import read_split
    from cirlab.serving.engine import build_index
    from cirlab.training.train import save_zero_shot

    out = Path(out)
    shutil.rmtree(out, ignore_errors=True)
    gallery = out / "gallery"
    gallery.mkdir(parents=True)
    for name, path in sorted(read_split("synth", data_root, "test1").gallery.items())[:images]:
        (gallery / Path(path).name).symlink_to(Path(path).resolve())
    torch.manual_seed(0)
    tiny_backbone("clip", **CLIP).save_pretrained(out / "clip")
    ckpt = save_zero_shot("sum", out / "clip", out / "sum")
    row = {"index_images": images}
    t = time.perf_counter()
    build_index(ckpt, gallery, out / "ix-local", progress=False)
    row["index_build_images_per_s"] = round(images / (time.perf_counter() - t), 1)
    try:
        import ray as ray_module
    except ImportError:
        ray = False
    if not ray:
        row["index_build_images_per_s_ray"] = None
        return row
    ray = ray_module
    ray.init(num_cpus=actors, include_dashboard=False, log_to_driver=False)
    try:
        t = time.perf_counter()
        build_index(ckpt, gallery, out / "ix-ray", progress=False, engine="ray", concurrency=actors)
        row["index_build_images_per_s_ray"] = round(images / (time.perf_counter() - t), 1)
        row["ray_actors"] = actors
    finally:
        ray.shutdown()
    return row


def _in_process(fn, *args):
    """fn(*args) in a fresh spawned process (its own peak memory, no state shared with the others), under the
    allocator the demo's lanes get (cirlab/allocator.py)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with allocator.for_children(), ctx.Pool(1, initializer=allocator.prepare) as pool:
        return pool.apply(fn, args)


def run_bench(out, quick: bool = False, device: str = "cpu", seed: int = 0, log=print) -> dict:
    from cirlab.experiments.demo import ensure_world
    from cirlab.methods import REGISTRY

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = SIZES["quick" if quick else "full"]
    data = out / "data"
    t0 = time.time()
    ensure_world(data, seed, "small", False, log)
    doc = {"device": device, "quick": quick, "batch_size": size["batch"], "steps": size["steps"],
           "threads": torch.get_num_threads(), "allocator": _in_process(allocator.describe),
           "machine": machine.describe(),
           "peak_gflops": _in_process(matmul_peak_gflops, 2048, 5, device),
           "methods": {}}
    log(f"[{time.time() - t0:6.1f}s] fp32 matmul peak: {doc['peak_gflops']} GFLOP/s")
    for name in sorted(REGISTRY):
        doc["methods"][name] = _in_process(measure_method, name, str(data), size, device)
        if doc["methods"][name]["train_gflops"] is not None:
            doc["methods"][name]["of_peak_pct"] = round(100 * doc["methods"][name]["train_gflops"] /
                                                        doc["peak_gflops"], 1)
        log(f"[{time.time() - t0:6.1f}s] {name}: {doc['methods'][name]}")
    doc["methods"]["csmcir"] |= _in_process(bank_overhead, str(data), size, device)
    log(f"[{time.time() - t0:6.1f}s] csmcir bank overhead: {doc['methods']['csmcir']['bank_overhead_pct']}%")
    doc["methods"]["csmcir"] |= _in_process(cache_speedup, str(data), str(out / "feature_cache"), size, device)
    log(f"[{time.time() - t0:6.1f}s] csmcir cache speedup: {doc['methods']['csmcir']['cache_speedup']}x")
    doc["index_build"] = _in_process(index_build_throughput, str(data), str(out / "index_build"),
                                     size["index_images"], 2)
    log(f"[{time.time() - t0:6.1f}s] index build: {doc['index_build']}")
    doc["seconds"] = round(time.time() - t0, 1)
    (out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "bench.md").write_text(markdown(doc))
    return doc


def markdown(doc: dict) -> str:
    lines = [f"# cirlab bench ({doc['device']}, {'quick' if doc['quick'] else 'full'}, batch {doc['batch_size']}, "
             f"{doc['threads']} threads, {doc.get('allocator', 'glibc')} malloc)", "",
             *([f"Machine: {machine.one_line(doc['machine'])}", ""] if doc.get("machine") else []),
             f"fp32 matmul peak of this machine: {doc['peak_gflops']} GFLOP/s", "",
             "| method | train samples/s | train GFLOP/s | of peak | eval images/s | peak RSS MB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in doc["methods"].items():
        train = "-" if row["train_samples_per_s"] is None else f"{row['train_samples_per_s']:.1f}"
        gflops = "-" if row.get("train_gflops") is None else f"{row['train_gflops']:.2f}"
        share = "-" if row.get("of_peak_pct") is None else f"{row['of_peak_pct']:.1f}%"
        lines.append(f"| {name} | {train} | {gflops} | {share} | {row['eval_images_per_s']:.1f} | "
                     f"{row['peak_rss_mb']:.0f} |")
    cs = doc["methods"]["csmcir"]
    per_round = ", ".join(f"{x:+.1f}" for x in cs.get("bank_overhead_pct_rounds", []))
    lines += ["", f"csmcir memory bank overhead: {cs['bank_overhead_pct']}% (median of rounds {per_round}; time in "
              f"the bank's calls: {cs.get('bank_share_pct')}% of the rest of the step; samples/s "
              f"{cs['train_samples_per_s_bank_off']} without, {cs['train_samples_per_s_bank_entropy']} with the "
              "entropy bank, full)",
              f"csmcir frozen-feature cache speedup: {cs['cache_speedup']}x (samples/s "
              f"{cs['train_samples_per_s_uncached']} recomputing the ViT, {cs['train_samples_per_s_cached']} from "
              f"the cache; ViT {cs['vision_params_m']} M parameters, Q-Former {cs['qformer_params_m']} M: "
              f"{cs['vision_to_qformer']} to 1)"]
    if "index_build" in doc:
        ib = doc["index_build"]
        ray = "not measured with Ray" if ib["index_build_images_per_s_ray"] is None else \
            f"{ib['index_build_images_per_s_ray']} with Ray at {ib['ray_actors']} actors"
        lines.append(f"index build (sum, {ib['index_images']} images): {ib['index_build_images_per_s']} images/s "
                     f"in one process, {ray}")
    lines += [f"Wall time {doc['seconds']} s.", ""]
    return "\n".join(lines)
