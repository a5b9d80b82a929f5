"""What each rank of tests/test_distributed.py's one process group runs: several trainings in a row, so that the
group's processes start (and import torch and transformers) once for all of them."""
from __future__ import annotations


def train_each(runs: list) -> None:
    """`train_method(**run)` for each run, in order, in this rank's process."""
    from cirlab.training.train import train_method

    for run in runs:
        train_method(**run)
