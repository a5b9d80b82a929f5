"""What every backbone wrapper shares: tokenising, preprocessing config, saving and loading."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from cirlab.data.images import Preprocess
from cirlab.errors import CirlabError

PREPROCESSOR_FILE = "preprocessor_config.json"


# transformers >= 5.2x loads with use_kernels=True whenever the `kernels` package is installed (transformers 5.25
# depends on it): on CUDA every train()/eval() then swaps layers for kernels fetched from the Hugging Face Hub at run
# time, which fails offline ("Version 1 of 'kernels-community/activation' is not available in the local cache",
# seen on an H200) and would otherwise run downloaded code. cirlab keeps the models' own torch layers.
NO_HUB_KERNELS = {"use_kernels": False}



def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """Packed rows (N, C) (the real tokens of a batch, as the unpadded text towers run them) back in the
    flattened padded layout (B * L, C) at `rows`, zeros at the padding."""
    return packed.new_zeros(b * length, packed.shape[-1]).index_copy(0, rows, packed)


def read_preprocess(folder: Path, default_size: int, source: str | None = None) -> Preprocess:
    """Read the image size, mean and std from a Hugging Face preprocessor_config.json (CLIP/BLIP style).

    `source` is a Hugging Face id whose file is looked up in the local hub cache (downloaded unless offline).
    """
    path = folder / PREPROCESSOR_FILE
    if source is not None:
        from transformers.utils import cached_file

        found = cached_file(source, PREPROCESSOR_FILE, _raise_exceptions_for_missing_entries=False)
        path = Path(found) if found else None
    if path is None or not path.exists():
        return Preprocess(size=default_size)
    cfg = json.loads(path.read_text())
    crop = cfg.get("crop_size") or cfg.get("size") or {}
    size = crop.get("height") or crop.get("shortest_edge") or default_size
    return Preprocess(size=int(size), mean=tuple(cfg.get("image_mean", Preprocess.mean)),
                      std=tuple(cfg.get("image_std", Preprocess.std)))


def write_preprocess(folder: Path, pre: Preprocess, processor_type: str) -> None:
    cfg = {"image_processor_type": processor_type, "do_resize": True, "do_center_crop": True,
           "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255, "resample": 3,
           "size": {"shortest_edge": pre.size}, "crop_size": {"height": pre.size, "width": pre.size},
           "image_mean": list(pre.mean), "image_std": list(pre.std)}
    (folder / PREPROCESSOR_FILE).write_text(json.dumps(cfg, indent=1) + "\n")


def resolve_source(source) -> str:
    """A local folder (must exist) or a Hugging Face id, as `from_pretrained` takes it."""
    s = str(source)
    looks_local = s.startswith((".", "/", "~")) or Path(s).exists() or s.count("/") > 1
    if looks_local and not Path(s).expanduser().exists():
        raise CirlabError(f"backbone folder not found: {s}")
    return str(Path(s).expanduser()) if looks_local else s


class Backbone(nn.Module):
    """Common surface: `tokenize`, `preprocess`, `save_pretrained`; subclasses add feature methods."""
    kind = ""
    hf_class = ""  # the transformers model class a checkpoint of this kind loads into

    @classmethod
    def from_pretrained(cls, source) -> "Backbone":
        """Load from a Hugging Face id or a local folder: the model, its tokenizer and its preprocessing."""
        import transformers

        src = resolve_source(source)
        model = getattr(transformers, cls.hf_class).from_pretrained(src, **NO_HUB_KERNELS)
        tokenizer = transformers.AutoTokenizer.from_pretrained(src)
        local = Path(src).exists()
        pre = read_preprocess(Path(src) if local else Path(), model.config.vision_config.image_size,
                              None if local else src)
        return cls(model, tokenizer, pre, src)

    def __init__(self, model, tokenizer, preprocess: Preprocess, source: str = ""):
        super().__init__()
        self.model, self.tokenizer, self.preprocess, self.source = model, tokenizer, preprocess, source

    @property
    def max_length(self) -> int:
        raise NotImplementedError

    def tokenize(self, texts, device=None) -> dict:
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        out = {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
        return {k: v.to(device) for k, v in out.items()} if device is not None else out

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, folder) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        write_preprocess(folder, self.preprocess, self.processor_type)
