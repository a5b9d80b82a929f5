"""TMCIR: the model (`model.py`) and its ablation grid (`ablation.py`). Its adaptive token fusion is
`layers/token_fusion.py`; stage 1 (pseudo-targets from `editing/`, then intent alignment) is
`training/intent_align.py`, which uses the generic loop and so sits with it (the import direction)."""
from cirlab.methods.tmcir.model import Tmcir, TmcirConfig

__all__ = ["Tmcir", "TmcirConfig"]
