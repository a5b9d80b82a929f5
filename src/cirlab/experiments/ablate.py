"""`cirlab ablate csmcir|tmcir|mapcompose`: train a method and one-field variants of it on the synthetic world.

csmcir: the reference row is csmcir's defaults (memory bank off); the bank rows turn on cirlab's entropy reading of
the paper's bank and change one thing of it (selection rule, margin, consistency, loss term, warm-up), the others
change the symmetric target tower (image-only, as SPRC-like methods) or the MCoT final captions (one level, none).

tmcir: a sweep of the token-fusion threshold (the paper's ablation figure, also drawn as `threshold_sweep.png`;
1.0 merges nothing, since a cosine never exceeds it), stage 2 straight from the pretrained CLIP (no stage 1), and
stage 1 on oracle pseudo-targets of several imperfection levels. Rows differ from the demo's variant only in the
field they name; the pipeline fields (`stage1`, `imperfection`) take the demo's stage-1 spec otherwise. Stage 1
runs once per imperfection level and is shared by the rows that use it.

mapcompose: 0, 100, 500 and 2000 synthetic triplets in stage II (0: stage I only; `triplets_sweep.png`), and
visual injection, soft alignment and hard negatives each off. Rows with the same stage-I config (injection, soft
alignment) share one stage I, trained by the first of them (whose `train_seconds` include it).

Each method's grid (its rows, the fields its table shows, its pipeline fields) is a table beside its config, in
`methods/<name>/ablation.py`. Every row starts from the method's config defaults (not the demo's variant) and uses
the full demo profile's backbone (pretrained once, shared) and the method's demo schedule on the default world, or with
`quick` on the small world
(`_quick_profile`), and is evaluated on val after each epoch (`epochs_to_best` is the epoch of the best val R@1,
the training-efficiency figure) and on test1 after the last epoch (`metrics`).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cirlab.methods.csmcir import ablation as _csmcir
from cirlab.methods.mapcompose import ablation as _mapcompose
from cirlab.methods.tmcir import ablation as _tmcir

# each method's grid lives beside its config (methods/<name>/ablation.py)
GRIDS = {"csmcir": _csmcir, "tmcir": _tmcir, "mapcompose": _mapcompose}
ROWS = {m: g.ROWS for m, g in GRIDS.items()}
FIELDS = {m: g.FIELDS for m, g in GRIDS.items()}
PIPELINE = {m: g.PIPELINE for m, g in GRIDS.items() if hasattr(g, "PIPELINE")}
SWEEPS = {m: g.SWEEP for m, g in GRIDS.items() if hasattr(g, "SWEEP")}
EXTRA_COLUMNS = {m: g.EXTRA_COLUMNS for m, g in GRIDS.items() if hasattr(g, "EXTRA_COLUMNS")}
EDITOR_FAILURES = _tmcir.EDITOR_FAILURES


def _quick_profile():
    """The small world with the full demo profile's backbone sizes: the quick demo's narrower CLIP (2 epochs) left
    csmcir near chance (test1 R@1 0.0 to 2.5 in every row), too weak for rows to differ by more than noise.
    tmcir's ten rows train 2 epochs each: with 3, the quick grid took 10 min 24 s on 2 cores, with 2 7 min 37 s."""
    from cirlab.experiments.demo import PROFILES, DemoProfile

    base = PROFILES["full"]
    return DemoProfile(
        world="small",
        backbones={name: base.backbones[name] | {"pretrain": base.backbones[name]["pretrain"] | {"epochs": epochs}}
                   for name, epochs in (("clip", 4), ("blip2", 3))},
        train=base.train, method_train=base.method_train | {"tmcir": {"epochs": 2}},
        method_config=base.method_config, stage1=base.stage1, zero_shot=base.zero_shot)
COLUMNS = ("R@1", "R@5", "R@10", "R@50", "Rsubset@1")


def _variant(method: str, change: dict) -> tuple:
    """(method config for the run: its defaults with `change`; pipeline fields; the ablated fields as shown)."""
    from enum import Enum

    from cirlab.methods import method_class

    defaults = PIPELINE.get(method, {})
    config = {k: v for k, v in change.items() if k not in defaults}
    pipeline = defaults | {k: v for k, v in change.items() if k in defaults}
    cls = method_class(method).config_class
    full, base = cls.from_json(config), cls()
    shown = {}
    for f in FIELDS[method]:
        value = pipeline[f] if f in pipeline else getattr(full, f)
        if isinstance(value, dict):  # the dict's mode (if any), then the keys this row changes
            default = getattr(base, f)
            mode = value.get("mode", default.get("mode"))
            rest = [f"{k}={v}" for k, v in value.items() if k != "mode" and default.get(k) != v]
            value = ", ".join(([str(mode)] if mode is not None else []) + rest)
        shown[f] = value.value if isinstance(value, Enum) else value  # a Choice shown as its plain string
    return config, pipeline, shown


def _cell(value) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else str(value)


def format_markdown(doc: dict) -> str:
    """Means over seeds, and for R@1, R@10 and Rsubset@1 the difference to the reference row with its 95%
    interval (paired over queries and seeds)."""
    fields = FIELDS[doc["method"]]
    extra = EXTRA_COLUMNS.get(doc["method"], {})
    compared = [c for c in COMPARED if all(c in r.get("ci", {}) for r in doc["rows"])]
    head = [*fields, *COLUMNS, *(f"Δ{c} [95%]" for c in compared), "val R@1 per epoch", "epochs_to_best",
            "train_seconds", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(fields) + "---:|" * (len(head) - len(fields))]
    for row in doc["rows"]:
        curve = " ".join(f"{v:.1f}" for v in row["val_curve"])
        parts = row.get("last_epoch_parts", {})
        deltas = ["ref." if row.get("reference") else
                  f"{row['ci'][c]['diff']:+.2f} [{row['ci'][c]['ci'][0]:+.2f}, {row['ci'][c]['ci'][1]:+.2f}]"
                  for c in compared]
        lines.append("| " + " | ".join([*(_cell(row["variant"][f]) for f in fields),
                                        *(f"{row['metrics'][c]:.2f}" for c in COLUMNS), *deltas,
                                        curve, str(row["epochs_to_best"]), f"{row['train_seconds']:.0f}",
                                        *(f"{parts[k]:.2f}" if k in parts else "" for k in extra.values())])
                     + " |")
    return "\n".join(lines) + "\n"


def _run_row(method: str, config: dict, data: Path, backbone: Path, folder: Path, cfg, val, test, stores,
             zero_shot: dict | None = None) -> dict:
    """Train one row, evaluating val after each epoch (after training, for a zero-shot row with no stage II);
    test1 after the last epoch or, where the method's ablation selects by val (`SELECT`), at the epoch of the best
    val R@1 (a copy of that epoch's checkpoint is kept in `<folder>.best`). `zero_shot`: {"spec": the profile's
    zero-shot schedule, "triplets": N, "min_match": F1, "stage1_from": a folder whose stage I to reuse, or None}."""
    import shutil

    from cirlab.evaluation.protocols import evaluate
    from cirlab.methods import load_model
    from cirlab.training.train import train

    curve, eval_seconds = [], [0.0]
    best_dir = folder.with_name(folder.name + ".best")
    by_val = SELECT.get(method) == "best_val"

    def on_epoch(model, _folder):
        t = time.time()
        metrics, _ = evaluate(model, val, progress=False, store=stores["val"])
        curve.append(round(metrics["R@1"], 2))
        if by_val and curve[-1] == max(curve) and curve.index(curve[-1]) == len(curve) - 1:  # a new best
            shutil.rmtree(best_dir, ignore_errors=True)
            shutil.copytree(folder, best_dir)
        eval_seconds[0] += time.time() - t

    t = time.time()
    if zero_shot is None:
        train(method, data, backbone, folder, cfg, config, on_epoch=on_epoch)
        log = folder.with_name(folder.name + ".train") / "metrics.jsonl"
    else:
        from cirlab.training.loop import TrainConfig

        spec = zero_shot["spec"]
        train(method, data, backbone, folder, TrainConfig(seed=cfg.seed, progress=False, **spec["stage1"]), config,
              {"stage2": TrainConfig(seed=cfg.seed, progress=False, **spec["stage2"]),
               "triplets": zero_shot["triplets"], "seed": cfg.seed, "log": lambda _m: None,
               "min_match": zero_shot.get("min_match", 0.8),
               "stage1_from": zero_shot["stage1_from"], "on_epoch": on_epoch})
        log = folder.with_name(folder.name + ".train") / "stage2" / "metrics.jsonl"
    train_seconds = time.time() - t - eval_seconds[0]
    model = load_model(folder)
    if not curve:
        on_epoch(model, folder)
    best = max(range(len(curve)), key=lambda e: (curve[e], -e))
    last, _ = evaluate(model, test, progress=False, store=stores["test"]) if by_val else (None, None)
    if by_val and best_dir.exists():
        model = load_model(best_dir)
    metrics, ranking = evaluate(model, test, progress=False, store=stores["test"])
    row = {"metrics": {k: round(v, 2) for k, v in metrics.items()}, "val_curve": curve,
           "epochs_to_best": best + 1, "train_seconds": round(train_seconds, 1),
           "last_epoch_parts": _last_epoch_parts(log), "ranking": ranking}
    if by_val:
        row |= {"checkpoint": f"best val (epoch {best + 1})", "last_epoch_metrics": {k: round(v, 2)
                                                                                     for k, v in last.items()}}
    return row


def _last_epoch_parts(log: Path) -> dict:
    """Mean of each logged loss part (`loss/<name>`) over the last epoch's log lines (tmcir: merged text tokens
    per query, which says how much the threshold lets merge)."""
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    steps = [x for x in lines if "loss" in x]
    if not steps:
        return {}
    last = [x for x in steps if x["epoch"] == steps[-1]["epoch"]]
    keys = sorted({k for x in last for k in x if k.startswith("loss/")})
    return {k[5:]: round(sum(x[k] for x in last if k in x) / sum(k in x for x in last), 4) for k in keys}


def _write(out: Path, doc: dict) -> str:
    from cirlab.atomic import write_atomic

    write_atomic(out / "ablation.json", lambda f: f.write((json.dumps(doc, indent=1) + "\n").encode()))
    table = format_markdown(doc)
    seeds = doc.get("seeds", [doc["seed"]])
    (out / "ablation.md").write_text(
        f"# Ablation of {doc['method']} (synthetic world: {doc['world']}, world seed {doc['seed']}, training "
        f"seed(s) {', '.join(map(str, seeds))})\n\nTest1 metrics after the last epoch, means over the training "
        f"seeds; val R@1 after each epoch. Δ: the row minus the reference row ({doc.get('reference_row')}), with "
        f"the 95% paired bootstrap interval over queries{' and seeds' if len(seeds) > 1 else ''}; an interval that "
        f"contains 0 is a tie. Per-query results: per_query/<row>/seed-<s>.jsonl.\n\n{table}")
    return table


def _row_backbone(method: str, pipeline: dict, backbone: Path, ckpts: Path, data: Path, profile, seed: int,
                  progress: bool, log, tag: str = "") -> Path:
    """The backbone a row trains from: the shared one, or its stage-1 result (made once per spec)."""
    if not pipeline.get("stage1"):
        return backbone
    from cirlab.experiments.demo import ensure_intent_backbone

    from cirlab.editing import oracle

    failures = pipeline.get("failures", "none")
    if failures not in EDITOR_FAILURES:
        from cirlab.errors import CirlabError
        raise CirlabError(f"unknown editor failure setting {failures!r}; known: {', '.join(EDITOR_FAILURES)}")
    spec = profile.stage1[method] | {"imperfection": pipeline["imperfection"]}
    if failures != "none":
        spec["failures"] = getattr(oracle, EDITOR_FAILURES[failures])
    name = f"{method}-stage1-p{spec['imperfection']}" + ("" if failures == "none" else f"-{failures}")
    return ensure_intent_backbone(backbone, ckpts / f"{name}{tag}", data, spec, seed, progress, log)


def plot_sweep(doc: dict, path: Path) -> None:
    """test1 R@1 and R@10 and best val R@1 against the method's swept field, over the rows whose other fields
    are at their defaults."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    field, _name, xlabel, log_x = SWEEPS[doc["method"]]
    defaults = _variant(doc["method"], {})[2]
    rows = sorted((r for r in doc["rows"] if all(r["variant"][k] == v for k, v in defaults.items() if k != field)),
                  key=lambda r: r["variant"][field])
    xs = [r["variant"][field] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, ys in (("test1 R@1", [r["metrics"]["R@1"] for r in rows]),
                      ("test1 R@10", [r["metrics"]["R@10"] for r in rows]),
                      ("best val R@1", [max(r["val_curve"]) for r in rows])):
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("symlog", linthresh=max(1, min(x for x in xs if x > 0) if any(xs) else 1))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("recall (%)")
    ax.set_title(f"{doc['method']}: {field} ({doc['world']} world, seed {doc['seed']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from cirlab.atomic import write_atomic

    write_atomic(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)


def row_name(change: dict) -> str:
    """A row's folder name under per_query/: "reference" for the defaults, else its changes ("field=value",
    dict fields dotted, joined by "+")."""
    def flat(d: dict, prefix: str = "") -> list:
        return [x for k, v in d.items()
                for x in (flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}={v}"])]

    return "+".join(flat(change)).replace("/", "_").replace(" ", "") or "reference"


def _reference_index(names: list, rows: list, reference: str | None) -> int:
    """The row every other is compared with: the one named `reference`, else the first with no change, else the
    first row."""
    if reference is not None:
        if reference not in names:
            from cirlab.errors import CirlabError
            raise CirlabError(f"no ablation row named {reference!r}; rows: {', '.join(names)}")
        return names.index(reference)
    return next((i for i, r in enumerate(rows) if not r), 0)


def select_rows(method: str, names: list) -> list:
    """The rows of `method`'s grid with these names (`row_name`), in the grid's order."""
    from cirlab.errors import CirlabError

    grid = {row_name(r): r for r in ROWS[method]}
    unknown = [n for n in names if n not in grid]
    if unknown:
        raise CirlabError(f"no {method} ablation row named {', '.join(unknown)}; rows: {', '.join(grid)}")
    return [r for n, r in grid.items() if n in names]


def run_ablation(method: str, out, quick: bool = False, seed: int = 0, progress: bool = True, profile=None,
                 rows: list | None = None, data=None, seeds: list | None = None, resamples: int = 10000,
                 reference: str | None = None) -> dict:
    """Train and evaluate each row once per training seed in `seeds` (default: `seed` alone) on the world and
    backbone of `seed`; `profile`, `rows` and an existing world folder `data` override the defaults.

    Each row gains `per_seed` (each seed's figures), the mean over seeds as `metrics`, and `ci`: the interval of its
    difference to the reference row (the first row with no change), paired over queries and seeds."""
    from cirlab.experiments.demo import PROFILES
    from cirlab.errors import CirlabError

    if method not in ROWS:
        raise CirlabError(f"no ablation grid for {method!r}; grids exist for {', '.join(ROWS)}")
    seeds = list(seeds) if seeds else [seed]
    if len(set(seeds)) != len(seeds):
        raise CirlabError(f"--seeds repeats a seed: {seeds}")
    t0 = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    profile = profile or (_quick_profile() if quick else PROFILES["full"])
    base = profile.train | profile.method_train.get(method, {})
    grid = ROWS[method] if rows is None else rows
    names = [row_name(c) for c in grid]
    if len(set(names)) != len(names):
        raise CirlabError(f"two ablation rows make the same change: {names}")
    _reference_index(names, grid, reference)  # a bad name fails before any training
    results, records = [], []
    env = {"method": method, "out": out, "base": base, "seed": seed, "profile": profile, "progress": progress,
           "log": log, "stage1_done": {}} | _shared_inputs(method, out, profile, data, seed, progress, log)
    for i, change in enumerate(grid):
        row, row_records = _row_over_seeds(env, i, len(grid), change, names[i], seeds)
        results.append(row)
        records.append(row_records)
    ref = _reference_index(names, grid, reference)
    from cirlab.evaluation.compare import compare_records

    for i, row in enumerate(results):
        row["ci"] = compare_records(records[ref], records[i], COMPARED, resamples, seed=0)
        row["reference"] = i == ref
    doc = {"method": method, "world": profile.world, "seed": seed, "seeds": seeds, "reference_row": names[ref],
           "train": {k: v for k, v in base.items()}, "rows": results, "seconds": round(time.time() - t0, 1)}
    _write_outputs(out, method, doc, log)
    return doc


def _shared_inputs(method: str, out: Path, profile, data, seed: int, progress: bool, log) -> dict:
    """What every row shares: the world (written into `out/data` unless `data` names one), the backbone pretrained
    with `seed`, the val and test1 splits, their decoded images and test1's queries with a target."""
    from cirlab.backbones import load_backbone
    from cirlab.data.images import PixelStore
    from cirlab.data.readers import read_split
    from cirlab.experiments.demo import ensure_backbone, ensure_world
    from cirlab.methods import method_class

    if data is None:
        data = out / "data"
        ensure_world(data, seed, profile.world, progress, log)
    data = Path(data)
    kind = method_class(method).backbone_kind
    backbone = ensure_backbone(kind, out / "checkpoints", data, profile, seed, progress, log)
    val, test = read_split("synth", data, "val"), read_split("synth", data, "test1")
    pre = load_backbone(kind, backbone).preprocess  # every row shares the backbone, so decoded images are shared
    return {"data": data, "backbone": backbone, "val": val, "test": test,
            "stores": {"val": PixelStore(val.gallery, pre), "test": PixelStore(test.gallery, pre)},
            "queries": [q for q in test.queries if q.targets]}


def _row_over_seeds(env: dict, i: int, rows: int, change: dict, name: str, seeds: list) -> tuple:
    """Row `i` (of `rows`) trained once per seed: (its entry in the table, with `per_seed` figures and their mean;
    each seed's per-query records)."""
    config, pipeline, shown = _variant(env["method"], change)
    env["log"](f"row {i + 1}/{rows}: {shown}" + (f" (seeds {seeds})" if len(seeds) > 1 else ""))
    per_seed, row_records = [], []
    for s in seeds:
        tag = f"-s{s}" if len(seeds) > 1 else ""
        row, recs = _row_seed(env, i, change, config, pipeline, name, s, tag)
        per_seed.append({"seed": s, **row})
        row_records.append(recs)
        env["log"](f"  seed {s}: test1 R@1 {row['metrics']['R@1']:.2f}  R@10 {row['metrics']['R@10']:.2f}; val R@1 "
                   f"by epoch {row['val_curve']}; {row['train_seconds']:.0f} s")
    entry = {"name": name, "variant": shown, "config": config, **({"pipeline": pipeline} if pipeline else {}),
             **_mean_row(per_seed), "per_seed": per_seed, "per_query": f"per_query/{name}"}
    return entry, row_records


def _write_outputs(out: Path, method: str, doc: dict, log) -> None:
    """ablation.json and ablation.md (the table, also printed), and the method's sweep figure when its rows vary
    the swept field."""
    print(_write(out, doc))
    written = [out / "ablation.json", out / "ablation.md"]
    if method in SWEEPS and len({r["variant"][SWEEPS[method][0]] for r in doc["rows"]}) > 1:
        plot_sweep(doc, out / SWEEPS[method][1])
        written.append(out / SWEEPS[method][1])
    log(f"done: {', '.join(map(str, written))}")


def _row_seed(env: dict, i: int, change: dict, config: dict, pipeline: dict, name: str, s: int, tag: str) -> tuple:
    """One row trained with seed `s`, or its figures read back when a run with the same key finished it before:
    (figures, per-query records). `env` holds what every row shares (run_ablation's settings and data)."""
    from cirlab.atomic import write_atomic
    from cirlab.evaluation.per_query import read_records, write_records
    from cirlab.methods import TrainingKind, method_class
    from cirlab.training.loop import TrainConfig

    method, out, profile, log = env["method"], env["out"], env["profile"], env["log"]
    done_file = out / "rows" / name / f"seed-{s}.json"
    per_query = out / "per_query" / name / f"seed-{s}.jsonl"
    key = {"method": method, "config": config, "pipeline": pipeline, "train": env["base"], "seed": s,
           "world_seed": env["seed"], "world": profile.world, "profile": repr(profile)}
    row = _finished_row(done_file, per_query, key)
    if row is not None:
        log(f"  seed {s}: reusing {done_file}")
        return row, read_records(per_query)
    cfg = TrainConfig(**(env["base"] | {"seed": s, "progress": env["progress"]}))
    start = _row_backbone(method, pipeline, env["backbone"], out / "checkpoints", env["data"], profile, s,
                          env["progress"], log, tag)
    folder = out / "checkpoints" / f"{method}-{_row_index(method, change, i)}{tag}"
    zero_shot = None
    if method_class(method).training is TrainingKind.ZERO_SHOT:  # rows with one stage-I config share it
        shared = json.dumps({k: config.get(k) for k in ("visual_injection", "soft_align")} | {"seed": s})
        zero_shot = {"spec": _equal_steps(profile.zero_shot[method], PIPELINE[method]["triplets"]),
                     "triplets": pipeline["triplets"], "min_match": pipeline["min_match"],
                     "stage1_from": env["stage1_done"].get(shared)}
        env["stage1_done"].setdefault(shared, folder)
    row = _run_row(method, config, env["data"], start, folder, cfg, env["val"], env["test"], env["stores"],
                   zero_shot)
    recs = row.pop("ranking").records(env["queries"])
    write_records(per_query, recs)
    done_file.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"key": key, "row": row}, indent=1).encode()
    write_atomic(done_file, lambda f: f.write(body))
    return row, recs


def _equal_steps(spec: dict, triplets: int) -> dict:
    """The zero-shot schedule with stage II's epochs fixed at the steps the default triplet count takes, so that
    every row of the triplet sweep makes the same optimizer steps under the same schedule (a smaller set is
    repeated) instead of fewer, floored steps with the warm-up peaking late."""
    stage2 = spec.get("stage2") or {}
    if not stage2 or stage2.get("steps_per_epoch"):
        return spec
    return spec | {"stage2": stage2 | {"steps_per_epoch": max(1, triplets // stage2.get("batch_size", 128))}}


def _row_index(method: str, change: dict, position: int) -> int:
    """A row's number in checkpoint folder names: its place in the method's grid (so that processes running
    different rows of it into one folder never share a checkpoint), else its place in the rows given."""
    grid = ROWS.get(method, [])
    return grid.index(change) if change in grid else position


def _finished_row(done_file: Path, per_query: Path | None, key: dict | None) -> dict | None:
    """A row-seed finished earlier: its figures when `done_file` exists with the same key (None: any key) and its
    per-query file is there (None: not checked), else None. Rows are written when they finish, so a killed
    ablation resumes at the first unfinished row, and rows split over processes sharing `out` join up."""
    if not done_file.is_file():
        return None
    doc = json.loads(done_file.read_text())
    if key is not None and doc.get("key") != json.loads(json.dumps(key)):
        return None
    if per_query is not None and not per_query.is_file():
        return None
    return doc["row"]


COMPARED = ("R@1", "R@10", "Rsubset@1")  # metrics whose difference to the reference row gets an interval
# methods whose ablation reports test1 at the epoch of the best val R@1 instead of the last
SELECT = {m: g.SELECT for m, g in GRIDS.items() if hasattr(g, "SELECT")}


def _mean_row(per_seed: list) -> dict:
    """Means over seeds of the figures of one row (val curve per epoch, test metrics, seconds)."""
    n = len(per_seed)
    metrics = {k: round(sum(r["metrics"][k] for r in per_seed) / n, 2) for k in per_seed[0]["metrics"]}
    curve = [round(sum(r["val_curve"][e] for r in per_seed) / n, 2) for e in range(len(per_seed[0]["val_curve"]))]
    best = max(range(len(curve)), key=lambda e: (curve[e], -e))
    parts = per_seed[0]["last_epoch_parts"]
    parts = {k: round(sum(r["last_epoch_parts"].get(k, 0.0) for r in per_seed) / n, 4) for k in parts}
    out = {"metrics": metrics, "val_curve": curve, "epochs_to_best": best + 1,
           "train_seconds": round(sum(r["train_seconds"] for r in per_seed) / n, 1), "last_epoch_parts": parts}
    if "checkpoint" in per_seed[0]:  # selected by val: which epoch each seed reported, and the last epochs' mean
        out["checkpoint"] = "; ".join(r["checkpoint"] for r in per_seed)
        out["last_epoch_metrics"] = {k: round(sum(r["last_epoch_metrics"][k] for r in per_seed) / n, 2)
                                     for k in per_seed[0]["last_epoch_metrics"]}
    return out
