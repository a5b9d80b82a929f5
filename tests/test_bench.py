"""`cirlab bench`'s pieces on tiny sizes: the rows have the documented keys and plausible values (timings are
printed by the benchmark, never asserted here)."""
from __future__ import annotations

from cirlab.experiments.bench import bank_overhead, cache_speedup, markdown, measure_method

TINY = {"steps": 2, "warmup": 1, "batch": 8, "eval_images": 16, "bank_capacity": 16}


def test_bench_rows_have_the_documented_fields(world, tmp_path):
    rows = {name: measure_method(name, str(world), TINY) for name in ("sum", "mapcompose")}
    assert rows["sum"]["train_samples_per_s"] is None  # nothing to train
    for name in ("mapcompose",):
        assert rows[name]["train_samples_per_s"] > 0
    assert all(r["eval_images_per_s"] > 0 and r["peak_rss_mb"] > 50 for r in rows.values())
    csmcir = measure_method("csmcir", str(world), TINY) | bank_overhead(str(world), TINY) | \
        cache_speedup(str(world), str(tmp_path / "cache"), TINY)
    assert {"bank_overhead_pct", "cache_speedup", "vision_to_qformer"} <= csmcir.keys()
    assert 4 < csmcir["vision_to_qformer"] < 6  # the ViT-g to Q-Former proportion the issue asks for
    assert any((tmp_path / "cache").rglob("shard-*.npy"))  # the cached run read from disk
    text = markdown({"device": "cpu", "quick": True, "batch_size": 8, "threads": 1, "seconds": 1.0,
                     "methods": rows | {"csmcir": csmcir}})
    assert "| mapcompose |" in text and "cache speedup" in text
