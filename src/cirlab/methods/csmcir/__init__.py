"""CSMCIR: the model (`model.py`) and its ablation grid (`ablation.py`). Its MCoT captions come from
`captioning/`, its training from the generic loop (`training.train`)."""
from cirlab.methods.csmcir.model import BANK_DEFAULTS, Csmcir, CsmcirConfig

__all__ = ["BANK_DEFAULTS", "Csmcir", "CsmcirConfig"]
