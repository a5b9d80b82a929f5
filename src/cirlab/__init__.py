"""cirlab: composed image retrieval methods, benchmarks, training, evaluation and search."""
__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load any saved cirlab model (a checkpoint folder written by `CIRModel.save`)."""
    from cirlab.methods import load_model

    return load_model(path, device=device)
