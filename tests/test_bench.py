"""`cirlab bench`'s pieces on tiny sizes: the rows have the documented keys and plausible values (timings are
printed by the benchmark, never asserted here)."""
from __future__ import annotations

import torch

from cirlab.experiments import machine
from cirlab.experiments.bench import bank_overhead, cache_speedup, index_build_throughput, markdown, \
    matmul_peak_gflops, measure_method, step_flops

TINY = {"steps": 2, "warmup": 1, "batch": 8, "eval_images": 16, "bank_capacity": 16}


def test_bench_rows_have_the_documented_fields(world, tmp_path):
    rows = {name: measure_method(name, str(world), TINY) for name in ("sum", "mapcompose")}
    assert rows["sum"]["train_samples_per_s"] is None  # nothing to train
    for name in ("mapcompose",):
        assert rows[name]["train_samples_per_s"] > 0 and rows[name]["train_gflops"] > 0
        # GFLOP/s is the step's counted work times steps per second
        expected = rows[name]["step_gflop"] * rows[name]["train_samples_per_s"] / TINY["batch"]
        assert abs(rows[name]["train_gflops"] - expected) <= 0.01 + 0.01 * expected
    assert all(r["eval_images_per_s"] > 0 and r["peak_rss_mb"] > 50 for r in rows.values())
    csmcir = measure_method("csmcir", str(world), TINY) | bank_overhead(str(world), TINY, rounds=3) | \
        cache_speedup(str(world), str(tmp_path / "cache"), TINY)
    assert {"bank_overhead_pct", "cache_speedup", "vision_to_qformer"} <= csmcir.keys()
    rounds = csmcir["bank_overhead_pct_rounds"]  # the overhead is the median of the paired rounds
    assert len(rounds) == 3 and abs(csmcir["bank_overhead_pct"] - sorted(rounds)[1]) <= 0.11
    assert csmcir["bank_share_pct"] > 0  # the full bank hands out negatives, which takes time
    assert 4 < csmcir["vision_to_qformer"] < 6  # the ViT-g to Q-Former proportion the issue asks for
    assert any((tmp_path / "cache").rglob("shard-*.npy"))  # the cached run read from disk
    where = machine.describe() | {"mkl_cbwr": "AVX2"}
    text = markdown({"device": "cpu", "quick": True, "batch_size": 8, "threads": 1, "seconds": 1.0, "peak_gflops": 9.0,
                     "methods": rows | {"csmcir": csmcir}, "machine": where})
    assert "| mapcompose |" in text and "cache speedup" in text
    assert f"Machine: {where['cpu']}, {where['cores']} cores" in text and "MKL_CBWR=AVX2" in text
    build = index_build_throughput(str(world), str(tmp_path / "ib"), 12, ray=False)  # Ray: tests/test_ray.py
    from cirlab.index import ImageIndex

    assert build["index_build_images_per_s"] > 0 and len(ImageIndex(tmp_path / "ib" / "ix-local")) == 12


def test_step_flops_counts_a_known_step_and_the_peak_is_measured():
    """A linear map (8 x 16 inputs, 16 x 4 weights) trained one step: forward 2*8*16*4 FLOPs, backward the weight
    gradient's as many again (the inputs need none)."""
    class Batch:
        def __init__(self, x):
            self.x = x

        def to(self, device):
            return self

    class Source:
        def batch(self, rows):
            return Batch(torch.ones(len(rows), 16))

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(16, 4))

        def loss(self, batch):
            return type("Out", (), {"loss": (batch.x @ self.w).sum()})()
    assert step_flops(Linear(), Source(), {"batch": 8}, "cpu") == 2 * 2 * 8 * 16 * 4
    assert matmul_peak_gflops(256, 2) > 0


def test_search_bench_counts_what_an_ivf_query_reads_and_tunes_to_its_targets(tmp_path):
    """bench/search.py at a small size: the rows an IVF query scans are its probed cells' sizes (every row when it
    probes every cell; the best cell's size, found by hand, with one probe), and the tuned rows reach their target."""
    import importlib.util
    import json
    from pathlib import Path

    import numpy as np

    from cirlab.index.backends import FaissBackend

    spec = importlib.util.spec_from_file_location("search_bench", Path(__file__).parents[1] / "bench" / "search.py")
    search = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search)
    rng = np.random.default_rng(1)
    x = search.sample(rng.normal(size=(8, 16)).astype(np.float32), 2000, rng)
    q = search.sample(rng.normal(size=(8, 16)).astype(np.float32), 5, rng)
    backend = FaissBackend(x, "ivf", nlist=20, nprobe=20)
    assert search.scanned(backend, q)["scanned_rows"] == 2000
    backend.set_search(nprobe=1)
    centroids = backend.index.quantizer.reconstruct_n(0, 20)
    sizes = [backend.index.invlists.list_size(c) for c in range(20)]
    expected = np.mean([sizes[int(np.argmax(centroids @ v))] for v in q])
    got = search.scanned(backend, q)
    assert got["scanned_rows"] == round(expected) and got["scanned_mb"] == round(expected * 16 * 4 / 1e6, 4)
    assert got["centroid_mb"] == round(20 * 16 * 4 / 1e6, 4) and "read_gb_per_s" not in got
    assert search.scanned(backend, q, 0.5)["read_gb_per_s"] == round((expected * 64 + 20 * 64) / 1e6 / 0.5, 2)

    out = tmp_path / "rows.json"
    assert search.main(["--n", "3000", "--dim", "16", "--queries", "40", "--clusters", "8", "--targets", "0.9",
                        "--skip", "hnsw,ivf_pq", "--mmap-threshold", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]  # glibc's malloc left as it was in this (the test's) process
    assert doc["malloc_mmap_threshold"] is None and all(r["rss_anon_gb"] > 0 for r in rows if "target_recall" in r)
    assert [r["backend"] for r in rows[:3]] == ["brute force (torch matmul)", "brute force (numpy matmul)",
                                                "faiss flat"]
    assert [r["backend"].split(" (")[0] for r in rows[3:]] == 2 * ["faiss ivf", "faiss ivf_sq8"]
    assert [r.get("coarse") for r in rows[3:]] == ["flat", "flat", "hnsw", "hnsw"]
    assert rows[1]["recall_at_10"] == rows[2]["recall_at_10"] == 1.0
    for row in rows[3:]:
        assert row["tune_recall"] >= 0.9 and 0 < row["scanned_rows"] <= 3000 and row["read_gb_per_s"] > 0
    # the graph computes distances to some centroids; the flat quantizer to all of them (nlist 4 sqrt(3000) = 76)
    assert 0 < rows[5]["centroid_mb"] and rows[3]["centroid_mb"] == round(76 * 16 * 4 / 1e6, 4)
