"""`cirlab demo --quick` runs end to end and writes every promised output."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from cirlab import allocator
from cirlab.experiments.profiles import DEMO_METHODS
from cirlab.methods import REGISTRY

KEYS = {"R@1", "R@5", "R@10", "R@50", "Rsubset@1", "Rsubset@2", "Rsubset@3"}


SEED = 3  # the seed of the session's world (tests/conftest.py)
# tmcir's stage 1 and stage 2, BLIP-2's pretraining (which csmcir waits for), then one lane per method
LANES = ("tmcir", "pretrain blip2", "combiner", "csmcir", "mapcompose", "pic2word", "image_only", "sum", "text_only")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, world, clip_dir, qformer_dir):
    """`cirlab demo --quick --seed 3`, run once: (its output folder, the finished process). It starts from the
    session's world and tiny backbones, which are what the demo would build at this seed and profile (conftest
    builds them through the demo's own `ensure_backbone`), so it reuses them and trains only the methods."""
    import shutil

    out = tmp_path_factory.mktemp("quick") / "demo"
    shutil.copytree(world, out / "data", copy_function=os.link)  # hard links: the demo only adds files
    for backbone in (clip_dir, qformer_dir):
        shutil.copytree(backbone, out / "checkpoints" / backbone.name)
    proc = subprocess.run([sys.executable, "-m", "cirlab.cli.main", "demo", "--quick", "--seed", str(SEED), "--out",
                           str(out), "--no-progress"], capture_output=True, text=True, timeout=900,
                          env=os.environ | {"HF_HUB_OFFLINE": "1"})
    return out, proc


def test_quick_demo(quick_demo):
    out, proc = quick_demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    assert doc["dataset"] == "synth" and doc["split"] == "test1" and doc["seed"] == SEED and doc["profile"] == "quick"
    assert doc["seconds"]["wall"] > 0 and doc["seconds"]["workers"] >= 1  # the time it took, beside the figures
    assert {"pretrain clip", "combiner", "stage 1 tmcir"} <= set(doc["seconds"]["steps"])
    malloc = "tcmalloc" if allocator.tcmalloc_library() else "glibc (tuned)"  # cirlab/allocator.py
    assert doc["seconds"]["allocator"] == {"main": malloc, "lanes": [malloc]}
    assert doc["machine"]["cores"] == len(os.sched_getaffinity(0)) and doc["machine"]["cpu"]  # where it ran
    assert doc["machine"]["torch"] == torch.__version__
    cpu = doc["seconds"]["cpu"]  # where the cores' time went: before the lanes, then each lane
    assert set(cpu["lanes"]) == set(LANES) and min(cpu["lanes"].values()) > 0
    assert cpu["total"] == pytest.approx(cpu["before_lanes"] + sum(cpu["lanes"].values()), abs=0.2)
    speed = doc["seconds"]["core_gflops"]  # the host's one-core rate before and after: runs compared at like speeds
    assert set(speed) == {"before", "after"} and min(speed.values()) > 0
    for kind in ("world", "backbone clip", "backbone blip2"):  # started from the session's, as it should
        assert f"{kind}: reusing" in proc.stdout + proc.stderr, kind
    assert set(doc["methods"]) == set(DEMO_METHODS) and set(DEMO_METHODS) <= set(REGISTRY)
    for name, metrics in doc["methods"].items():
        assert set(metrics) == KEYS, name
        assert all(0 <= v <= 100 for v in metrics.values())
        assert (out / "checkpoints" / name / "cirlab.json").is_file()
    assert metrics_monotone(doc["methods"])
    assert_above_chance(doc["methods"], out)
    assert_per_query_files_match(doc, out)
    report = (out / "report.md").read_text()
    assert report.startswith(f"# cirlab demo (quick profile, seed {SEED})") and "GFLOP/s before the run" in report
    assert "| combiner |" in report and "| tmcir (oracle stage 1, imperfection 0.1) |" in report  # variants named
    assert doc["variants"]["csmcir"] == "csmcir" and doc["variants"]["mapcompose"] == "mapcompose (zero-shot)"
    for name, base in (("csmcir", "combiner"), ("tmcir", "combiner"), ("mapcompose", "pic2word")):
        r = doc["versus_closest_baseline"][name]
        assert r["baseline"] == base and r["ci"][0] <= r["diff"] <= r["ci"][1]
        assert f"| {doc['variants'][name]} | {doc['variants'][base]} | R@1 |" in report
    assert Image.open(out / "retrievals.png").size[0] > 500
    assert (out / "data" / "captions" / "cap.rc2.test1.json").is_file()
    assert "| method |" in proc.stdout


def assert_above_chance(methods: dict, out) -> None:
    """The trained methods must have learned: a random ranking of the test1 gallery puts the target in the top 10
    with probability 10 / gallery size (under 1% here), and in the top 1 of the 5 other img_set members with 20%."""
    from cirlab.data.readers import read_split

    gallery = len(read_split("synth", out / "data", "test1").gallery)
    chance_r10 = 100 * 10 / gallery
    for name in ("combiner", "csmcir"):
        assert methods[name]["R@10"] > 10 * chance_r10, (name, methods[name])
    assert methods["csmcir"]["Rsubset@1"] > 30, methods["csmcir"]  # text alone reaches about 28 here
    assert max(m["R@1"] for m in methods.values()) > 3


def assert_per_query_files_match(doc: dict, out) -> None:
    """Each method's per-query file gives exactly its R@1, R@10 and Rsubset@1."""
    from cirlab.evaluation.per_query import metrics_from_records, read_records

    for name, metrics in doc["methods"].items():
        records = read_records(out / doc["per_query"][name])
        again = metrics_from_records(records, ["R@1", "R@10", "Rsubset@1"])
        assert {k: round(v, 2) for k, v in again.items()} == {k: metrics[k] for k in again}, name


def metrics_monotone(methods: dict) -> bool:
    """R@K never falls as K grows, nor Rsubset@K."""
    for m in methods.values():
        if not m["R@1"] <= m["R@5"] <= m["R@10"] <= m["R@50"]:
            return False
        if not m["Rsubset@1"] <= m["Rsubset@2"] <= m["Rsubset@3"]:
            return False
    return True


def test_killing_the_demo_kills_its_lane_workers(quick_demo, tmp_path):
    """SIGKILL on the demo process leaves no lane process training on (the workers die with their parent). The
    demo starts from the quick demo's world and CLIP (same seed and profile: it reuses them), so that its lanes
    start at once."""
    import shutil
    import signal
    import time
    import uuid

    done, _ = quick_demo
    shutil.copytree(done / "data", tmp_path / "demo" / "data", copy_function=os.link)
    shutil.copytree(done / "checkpoints" / "backbone-clip", tmp_path / "demo" / "checkpoints" / "backbone-clip")
    mark = uuid.uuid4().hex
    log = tmp_path / "demo.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cirlab.cli.main", "demo", "--quick", "--seed", str(SEED),
                                 "--workers", "2", "--out", str(tmp_path / "demo"), "--no-progress"], stdout=f,
                                stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1",
                                                                           "CIRLAB_TEST_MARK": mark})
    deadline = time.time() + 300
    while time.time() < deadline and "lanes" not in log.read_text():
        time.sleep(0.5)
    assert "lanes" in log.read_text(), log.read_text()[-2000:]
    assert "backbone clip: reusing" in log.read_text()
    time.sleep(3)
    assert len(_marked(mark)) >= 3  # the demo and its two lane workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _marked(mark):
        time.sleep(0.5)
    assert _marked(mark) == []


def _marked(mark: str) -> list:
    """Live processes whose environment carries `mark`."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"CIRLAB_TEST_MARK={mark}".encode() in env and state != "Z":
            found.append(int(pid))
    return found


def test_lane_order_waits_for_pretraining_and_beats_longest_first():
    """The lanes of the default demo: csmcir waits for BLIP-2's pretraining, and the order chosen from the
    profile's estimates finishes sooner in simulation than the longest lane first (pairs swapped from there, so
    never later); every lane is run once, and with no estimates the order is still complete."""
    from cirlab.experiments.demo import _lanes, _order, _simulated_wall
    from cirlab.experiments.profiles import PROFILES

    profile = PROFILES["default"]
    lanes = _lanes(sorted(profile.methods), REGISTRY, profile)
    assert [lane["name"] for lane in lanes] == list(LANES)
    assert {lane["name"]: lane["after"] for lane in lanes if lane["after"]} == {"csmcir": ["pretrain blip2"]}
    cost = {lane["name"]: 0.0 for lane in lanes}
    for step, seconds in profile.seconds.items():  # a lane's cost: its steps' (tmcir: stage 1, then stage 2)
        cost[step.removeprefix("stage 1 ")] += seconds
    ordered = _order(lanes, 2, profile.seconds)
    longest_first = sorted(lanes, key=lambda lane: -cost[lane["name"]])
    assert sorted(lane["name"] for lane in ordered) == sorted(LANES)
    # by hand, longest first: tmcir 226 beside the combiner 169; csmcir is not ready then, so mapcompose, pic2word
    # and the untrained ones fill in; BLIP-2 starts only when tmcir ends (226 + 60), csmcir then ends at 434
    assert _simulated_wall(longest_first, 2, cost) == pytest.approx(434.0)
    assert _simulated_wall(ordered, 2, cost) == pytest.approx(sum(cost.values()) / 2)  # both workers busy to the end
    chain = [lane["name"] for lane in ordered]
    assert chain.index("pretrain blip2") < chain.index("csmcir")
    assert len(_order(lanes, 2, {})) == len(lanes)
