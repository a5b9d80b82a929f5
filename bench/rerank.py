"""A cascade against each of its stages on a demo's world: test1 metrics, paired intervals, and latency a query.

    python bench/rerank.py --demo DEMO_OUT [--first combiner] [--second csmcir] [--ks 20,50,100]
                           [--queries 50] [--out docs/results/rerank.json]

Metrics: the first stage alone, the second over the whole gallery, and the cascade at each K (the CIRR protocol
through `evaluate` with `rerank`; per-query files beside the output, intervals from `compare_records` against
each stage alone). Latency: `Engine.search` by indexed id, one query at a time, over an index of test1 built with
each stage's model (the cascade's index is the first stage's, with the world's captions stored for a second stage
that reads them): the second stage then encodes the K candidates' images now, as a re-ranker added to an existing
index does. Threads: torch's default unless OMP_NUM_THREADS says otherwise (recorded).
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def quality(test, queries, first_ck: Path, second_ck: Path, names: tuple, ks: list, per_query: Path) -> list:
    """One row per ranking (the first stage alone, the second over the whole gallery, the cascade at each K): its
    test1 metrics, its per-query file, and (cascades) its paired intervals against each stage alone."""
    import cirlab
    from cirlab.evaluation.compare import compare_records
    from cirlab.evaluation.per_query import write_records
    from cirlab.evaluation.protocols import evaluate
    from cirlab.methods import checkpoint_identity

    first, second = cirlab.load(first_ck), cirlab.load(second_ck)
    rerank = (second, 0, second_ck / "cache", checkpoint_identity(second_ck))
    per_query.mkdir(parents=True, exist_ok=True)
    rows, records = [], {}

    def run(name, model, ck, k=None):
        m, ranking = evaluate(model, test, ck / "cache", checkpoint_identity(ck), progress=False,
                              rerank=None if k is None else rerank[:1] + (k,) + rerank[2:])
        records[name] = ranking.records(queries)
        write_records(per_query / f"{name.replace(' ', '_')}.jsonl", records[name])
        rows.append({"name": name, "k": k, "metrics": m})

    run(names[0], first, first_ck)
    run(f"{names[1]} (whole gallery)", second, second_ck)
    for k in ks:
        run(f"cascade top {k}", first, first_ck, k)
    for row in rows[2:]:
        row["vs_first"] = compare_records([records[rows[0]["name"]]], [records[row["name"]]])
        row["vs_second"] = compare_records([records[rows[1]["name"]]], [records[row["name"]]])
    return rows


def latency(engine, timed: list) -> dict:
    """p50 and p90 of `engine.search` over the (reference id, text) pairs, one at a time, after one warm-up."""
    engine.search(*timed[0], k=10)
    times = []
    for ref, text in timed:
        t0 = time.perf_counter()
        engine.search(ref, text, k=10)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_ms": round(1000 * times[len(times) // 2], 1), "p90_ms": round(1000 * times[int(.9 * len(times))], 1)}


def add_latencies(rows: list, data: Path, first_ck: Path, second_ck: Path, timed: list) -> None:
    """Each row's latency over an index of test1 built with its first model (the cascade's: the first stage's,
    re-ranked by the second)."""
    from cirlab.serving.engine import Engine, build_index

    work = Path(tempfile.mkdtemp(prefix="rerank-"))
    try:
        for name, ck in (("first", first_ck), ("second", second_ck)):
            build_index(ck, data / "test1", work / name, captions=data / "synth" / "captions.jsonl", progress=False)
        rows[0]["latency"] = latency(Engine(work / "first"), timed)
        rows[1]["latency"] = latency(Engine(work / "second"), timed)
        for row in rows[2:]:
            row["latency"] = latency(Engine(work / "first", rerank=second_ck, rerank_k=row["k"]), timed)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--demo", required=True, help="a demo's output folder (data/ and checkpoints/)")
    ap.add_argument("--first", default="combiner")
    ap.add_argument("--second", default="csmcir")
    ap.add_argument("--ks", default="20,50,100")
    ap.add_argument("--queries", type=int, default=50, help="queries timed (the first N of test1)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    import torch

    from cirlab.data.readers import read_split

    demo, out = Path(args.demo), Path(args.out)
    data, ckpts = demo / "data", demo / "checkpoints"
    first_ck, second_ck = ckpts / args.first, ckpts / args.second
    test = read_split("synth", data, "test1")
    queries = [q for q in test.queries if q.targets]
    rows = quality(test, queries, first_ck, second_ck, (args.first, args.second),
                   [int(k) for k in args.ks.split(",")], out.with_suffix(""))
    timed = [(q.reference, q.text) for q in queries[:args.queries]]
    add_latencies(rows, data, first_ck, second_ck, timed)
    doc = {"world": str(data), "split": "test1", "queries": len(queries), "timed_queries": len(timed),
           "first": args.first, "second": args.second, "threads": torch.get_num_threads(), "rows": rows}
    out.write_text(json.dumps(doc, indent=1) + "\n")
    for row in rows:
        m, lat = row["metrics"], row["latency"]
        extra = ""
        if "vs_first" in row:
            d = row["vs_first"]["R@1"]
            extra = f"  vs first R@1 {d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
        print(f"{row['name']:28s} R@1 {m['R@1']:6.2f} R@10 {m['R@10']:6.2f} Rsubset@1 {m['Rsubset@1']:6.2f} "
              f"p50 {lat['p50_ms']:7.1f} ms{extra}")


if __name__ == "__main__":
    main()
