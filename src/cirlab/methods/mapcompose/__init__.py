"""Mapping to composing (zero-shot) and its baseline pic2word: the models (`model.py`) and the ablation grid
(`ablation.py`). Their two-stage training and the triplet synthesis are `training/zero_shot.py` and
`training/synthesis.py`, which use the generic loop and so sit with it (the import direction)."""
from cirlab.methods.mapcompose.model import MapCompose, MapComposeConfig, Pic2Word, Pic2WordConfig

__all__ = ["MapCompose", "MapComposeConfig", "Pic2Word", "Pic2WordConfig"]
