"""Backbones over `transformers`, registered by name; each loads from a Hugging Face id or a local folder."""
from __future__ import annotations

from cirlab.errors import CirlabError

BACKBONES = {"clip": "cirlab.backbones.clip:ClipBackbone", "blip2": "cirlab.backbones.blip2:Blip2Backbone"}


def backbone_class(kind: str):
    if kind not in BACKBONES:
        raise CirlabError(f"unknown backbone {kind!r}; choose one of {', '.join(BACKBONES)}")
    import importlib

    module, name = BACKBONES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def load_backbone(kind: str, source):
    """Load a backbone of `kind` from a Hugging Face id or a folder written by `save_pretrained`."""
    return backbone_class(kind).from_pretrained(source)


def tiny_backbone(kind: str, **overrides):
    from cirlab.backbones import configs

    builders = {"clip": configs.tiny_clip, "blip2": configs.tiny_blip2}
    if kind not in builders:
        raise CirlabError(f"unknown backbone {kind!r}; choose one of {', '.join(builders)}")
    return builders[kind](**overrides)
