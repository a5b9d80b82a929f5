"""What a measurement ran on: the CPU, the cores, the instruction set torch's kernels use, and torch's version.

The demo's figures depend on the machine, not only through time: the same code and seed on an Intel Xeon (AVX-512,
AMX) and on an AMD EPYC (Zen 4) train to different per-query results, because the matrix products round in
another order on each (MKL and oneDNN choose their kernels by processor), and training carries a
rounding difference into every later step. Every results.json and bench.json therefore says where it was made.
"""
from __future__ import annotations

import os
from pathlib import Path

# CPU flags that change which kernels torch, MKL and oneDNN run (recorded when present)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> dict:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cores() -> int:
    """The cores this process may run on (its CPU affinity where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def describe() -> dict:
    """{"cpu", "cores", "flags", "torch", "kernels", "mkl_cbwr"}: the CPU's model name, the cores this process
    may use, the recorded flags it has, torch's version and CPU capability, and MKL_CBWR where it is set."""
    import platform

    import torch

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(), "cores": cores(),
            "flags": [f for f in _FLAGS if f in flags], "torch": torch.__version__,
            "kernels": torch.backends.cpu.get_cpu_capability(), "mkl_cbwr": os.environ.get("MKL_CBWR")}


def one_line(machine: dict) -> str:
    """e.g. 'Intel(R) Xeon(R) Processor, 2 cores (avx512f, amx_bf16), torch 2.13.0+cpu (AVX512 kernels)'."""
    flags = f" ({', '.join(machine['flags'])})" if machine.get("flags") else ""
    cbwr = f", MKL_CBWR={machine['mkl_cbwr']}" if machine.get("mkl_cbwr") else ""
    return (f"{machine['cpu']}, {machine['cores']} cores{flags}, torch {machine['torch']} "
            f"({machine['kernels']} kernels{cbwr})")


def matmul_peak_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """The best of `repeats` timed fp32 n x n matrix products, in GFLOP/s (2 n^3 FLOPs each)."""
    import time

    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return round(2 * n ** 3 / best / 1e9, 1)


def core_gflops(n: int = 1024, repeats: int = 20) -> float:
    """One core's fp32 matrix-product rate now: `matmul_peak_gflops` on one thread (about a third of a
    second). A shared host's speed drifts by 20% within an hour (measured: 168 then 147 GFLOP/s on the same VM), so
    a run that is timed records this before and after itself."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return matmul_peak_gflops(n, repeats)
    finally:
        torch.set_num_threads(threads)
