"""The research commands: compare (paired intervals between per-query files), ablate, bench, viz and demo."""
from __future__ import annotations

import json
from pathlib import Path

from cirlab.cli.args import DATASETS
from cirlab.errors import CirlabError


def _per_query_files(arg: str) -> list:
    """A comparison side: comma-separated per-query files, or a folder of them (its *.jsonl, sorted: seeds)."""
    files = []
    for part in (x for x in arg.split(",") if x):
        p = Path(part)
        if p.is_dir():
            found = sorted(p.glob("*.jsonl"))
            if not found:
                raise CirlabError(f"{p}: no per-query files (*.jsonl) in this folder")
            files += found
        else:
            files.append(p)
    return files


def cmd_compare(args) -> None:
    from cirlab.evaluation.compare import compare_files, format_comparison

    if args.resamples < 100:
        raise CirlabError(f"--resamples must be at least 100, got {args.resamples}")
    a, b = _per_query_files(args.a), _per_query_files(args.b)
    metrics = [m for m in args.metrics.split(",") if m]
    result = compare_files(a, b, metrics, args.resamples, args.seed)
    seeds = f"{len(a)} seed(s), " if len(a) > 1 else ""
    print(format_comparison(result, args.a, args.b))
    print(f"paired bootstrap over queries{' and seeds' if len(a) > 1 else ''} ({seeds}{args.resamples} resamples)")
    doc = {m: {k: (round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v]) for k, v in r.items()}
           for m, r in result.items()}
    if args.out:
        from cirlab.atomic import write_atomic

        body = (json.dumps({"a": [str(x) for x in a], "b": [str(x) for x in b], "resamples": args.resamples,
                            "seed": args.seed, "metrics": doc}, indent=1) + "\n").encode()
        write_atomic(args.out, lambda f: f.write(body))
        print(f"wrote {args.out}")
    if args.json:
        print(json.dumps(doc))


def cmd_bench(args) -> None:
    from cirlab.experiments.bench import run_bench

    doc = run_bench(args.out, quick=args.quick, device=args.device)
    print((Path(args.out) / "bench.md").read_text())
    print(f"written: {Path(args.out) / 'bench.json'}, {Path(args.out) / 'bench.md'} ({doc['seconds']} s)")


def cmd_ablate(args) -> None:
    from cirlab.experiments.ablate import run_ablation

    from cirlab.experiments.ablate import select_rows

    seeds = _int_list(args.seeds, "--seeds") if args.seeds else None
    rows = select_rows(args.method, [r for r in args.rows.split(",") if r]) if args.rows else None
    run_ablation(args.method, args.out, quick=args.quick, seed=args.seed, progress=not args.no_progress,
                 seeds=seeds, rows=rows, reference=args.reference)


def _int_list(text: str, what: str) -> list:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CirlabError(f"{what} takes comma-separated integers, got {text!r}") from None


def cmd_viz_tsne(args) -> None:
    from cirlab.experiments.viz import run_tsne

    doc = run_tsne(args.checkpoint, args.data_root, args.out, args.dataset, args.split, args.n, args.captions,
                   args.seed, args.device)
    for k, v in doc["stats"].items():
        print(f"{k}: {v}")
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.json')}")


def cmd_viz_bank(args) -> None:
    from cirlab.experiments.viz import bank_report

    doc = bank_report(args.checkpoint, args.data_root, args.n, args.split, args.seed)
    share = ", ".join(f"{k} edits {100 * v:.1f}%" for k, v in doc["share_by_edits"].items())
    print(f"{doc['negatives']} bank negatives for {doc['queries']} {args.split} queries: {share}; mean "
          f"{doc['mean_edits']} edits from the target ({doc['not_in_split']} outside the split)")
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {args.out}")


def cmd_demo(args) -> None:
    from cirlab.experiments.demo import run_demo

    extra = tuple(m for m in (args.with_methods or "").split(",") if m)
    if args.workers is not None and args.workers < 1:
        raise CirlabError(f"--workers must be at least 1, got {args.workers}")
    if args.quick and args.profile not in (None, "quick"):
        raise CirlabError(f"--quick is --profile quick; it cannot be combined with --profile {args.profile}")
    run_demo(args.out, seed=args.seed, profile_name="quick" if args.quick else args.profile or "default",
             progress=not args.no_progress, extra=extra, workers=args.workers, device=args.device)


def add_research_parsers(sub) -> None:
    """compare, ablate, bench, viz and demo."""
    p = sub.add_parser("compare", help="B minus A, query by query: paired bootstrap interval over queries and seeds")
    p.add_argument("a", help="per-query file(s) of A: comma-separated (one per seed) or a folder of *.jsonl")
    p.add_argument("b", help="per-query file(s) of B, in the same seed order as A")
    p.add_argument("--metrics", default="R@1,R@10,Rsubset@1", help="R@K, Rsubset@K, mAP@K, comma-separated")
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    p.add_argument("--json", action="store_true", help="end with one JSON object: {metric: {a, b, diff, ci}}")
    p.add_argument("--out", help="also write the inputs and the figures to this JSON file")
    p.set_defaults(func=cmd_compare)


    p = sub.add_parser("ablate", help="train a method's ablation grid on the synthetic world; ablation.json + .md")
    p.add_argument("method", choices=("csmcir", "tmcir", "mapcompose"))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0, help="seed of the world and backbone (and of training, "
                                                          "without --seeds)")
    p.add_argument("--seeds", help="training seeds, comma-separated (e.g. 0,1,2): each row trains once per seed")
    p.add_argument("--rows", help="only these rows, by name, comma-separated (names as in per_query/; "
                                  "'reference' for the defaults)")
    p.add_argument("--reference", help="the row the intervals compare with (default: the method's defaults)")
    p.add_argument("--quick", action="store_true", help="the small world (under 10 minutes on 2 cores) instead of "
                                                        "the default one (about 3 minutes per row)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("bench", help="throughput and memory per method, memory-bank overhead, feature-cache speedup")
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="fewer steps and images (a few minutes on 2 cores)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_bench)

    _add_viz_parsers(sub)

    p = sub.add_parser("demo", help="synth, pretrain, train and evaluate every method; write a report")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=("default", "full", "quick"), default=None,
                   help="default: 8 minutes on 2 cores; full: the longer shared stages (CLIP pretraining 3 epochs, "
                        "the Q-Former's 2, zero-shot stage I 2: about 9-11 minutes); quick: a smoke test")
    p.add_argument("--quick", action="store_true", help="--profile quick: the small world and short schedules "
                                                        "(about 2.5 minutes)")
    p.add_argument("--with", dest="with_methods", metavar="METHODS",
                   help="comma-separated registered methods to run besides the default ones")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that train the lanes (a method each, with its stage 1 if it has one; a backbone "
                        "pretrained for some of them) side by side; default: one per core")
    p.add_argument("--device", default="cpu", help="torch device every lane trains and evaluates on (cuda: bf16 "
                   "autocast, as training does there)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)


def _add_viz_parsers(sub) -> None:
    """viz tsne and viz bank: figures of a checkpoint's embedding space and of csmcir's bank."""
    p = sub.add_parser("viz", help="figures of a checkpoint's embedding space")
    viz_sub = p.add_subparsers(dest="viz_command", required=True)
    p = viz_sub.add_parser("tsne", help="t-SNE of queries, target images and target captions (PNG + JSON figures)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=DATASETS, default="synth")
    p.add_argument("--split", default="test1")
    p.add_argument("--n", type=int, default=300, help="queries to plot")
    p.add_argument("--captions", help="caption cache (JSONL) when the split has no captions of its own")
    p.add_argument("--out", default="tsne.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=cmd_viz_tsne)
    p = viz_sub.add_parser("bank", help="csmcir: how many scene-graph edits from the target its bank's negatives "
                                        "are (synthetic world)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="train", help="the split whose triplets ask for negatives (the bank holds "
                                                    "train targets)")
    p.add_argument("--n", type=int, default=256, help="triplets to sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the figures as JSON")
    p.set_defaults(func=cmd_viz_bank)
