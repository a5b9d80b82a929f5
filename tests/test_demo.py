"""`cirlab demo --quick` runs end to end and writes every promised output."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from PIL import Image

from cirlab.methods import REGISTRY

KEYS = {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"}


def test_quick_demo(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "cirlab.cli.main", "demo", "--quick", "--seed", "1", "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=900,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["dataset"] == "synth" and doc["split"] == "test1" and doc["seed"] == 1
    assert set(doc["methods"]) == {n for n, c in REGISTRY.items() if c.in_demo}
    for name, metrics in doc["methods"].items():
        assert set(metrics) == KEYS, name
        assert all(0 <= v <= 100 for v in metrics.values())
        assert (out / "checkpoints" / name / "cirlab.json").is_file()
    assert metrics_monotone(doc["methods"])
    assert "| combiner |" in (out / "report.md").read_text()
    assert Image.open(out / "retrievals.png").size[0] > 500
    assert (out / "data" / "captions" / "cap.rc2.test1.json").is_file()
    assert "| method |" in proc.stdout


def metrics_monotone(methods: dict) -> bool:
    """R@K never falls as K grows, nor Rsubset@K."""
    for m in methods.values():
        if not m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@50"]:
            return False
        if not m["Rsubset@1"] <= m["Rsubset@2"] <= m["Rsubset@3"]:
            return False
    return True
