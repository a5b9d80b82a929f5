"""caption_compose: the model (`model.py`) and its composer (`composer.py`: the prompt, the oracle, hf and openai
backends, and the answer cache). The reference's description comes from `captioning/`."""
from cirlab.methods.caption_compose.model import CaptionCompose, CaptionComposeConfig

__all__ = ["CaptionCompose", "CaptionComposeConfig"]
