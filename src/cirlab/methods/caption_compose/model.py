"""`caption_compose`: training-free composed retrieval through text, the recipe of CIReVL, LDRE, SEIZE and OSrCIR.

A captioner describes the reference image (`cirlab caption`'s backends: the description is the reference's
`final_caption`, from a caption cache or captioned at ingest), a composer rewrites that description with the
modification text into a description of the target (captioning/compose.py: the synthetic world's oracle, a
transformers causal LM or an OpenAI-compatible chat endpoint, every answer cached), and the description's CLIP
text feature is scored against the gallery's CLIP image features. Nothing is trained.

Options (config fields): `samples` descriptions per query, sampled at `temperature`, their text features
averaged (LDRE's ensemble; 1 by default, greedy); `image_weight` fuses the reference image's feature into the
query, q = normalise((1 - w) t + w i); `caption_weight` scores targets against their captions too,
s = (1 - w) cos(q, image) + w cos(q, caption), written as one target vector (1 - w) image + w caption, so exact
search and every index backend rank by it unchanged (its targets are then not unit length). The papers' rerank
stages are not implemented.

The answer cache is the config's `cache` file, else CHECKPOINT/cache/compose.jsonl for a loaded checkpoint
(outside its identity: answers do not change what the checkpoint is), else memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cirlab.errors import Choice, CirlabError
from cirlab.methods.base import MethodConfig, register
from cirlab.methods.baselines import ClipFeatures


class ComposerKind(Choice):
    ORACLE = "oracle"
    HF = "hf"
    OPENAI = "openai"


@dataclass
class CaptionComposeConfig(MethodConfig):
    composer: ComposerKind = ComposerKind.OPENAI
    composer_model: str = ""  # hf: a Hugging Face id or folder; openai: the served model's name
    composer_base_url: str = ""  # openai: the endpoint (else $CIRLAB_OPENAI_BASE_URL, then $OPENAI_BASE_URL)
    oracle_root: str = ""  # oracle: the synthetic world's data root
    imperfection: float = 0.0  # oracle: the editor's imperfection, applied to the composed scene
    samples: int = 1
    temperature: float = 0.7  # sampling temperature when samples > 1
    max_tokens: int = 96
    image_weight: float = 0.0
    caption_weight: float = 0.0
    cache: str = ""


@register
class CaptionCompose(ClipFeatures):
    name = "caption_compose"
    config_class = CaptionComposeConfig

    def __init__(self, config: CaptionComposeConfig, backbone):
        super().__init__(config, backbone)
        from cirlab.methods.caption_compose.composer import ComposeCache, ComposeStats

        if config.samples < 1:
            raise CirlabError(f"CaptionComposeConfig.samples must be at least 1, got {config.samples}")
        for name in ("image_weight", "caption_weight", "imperfection"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise CirlabError(f"CaptionComposeConfig.{name} must be in [0, 1], got {getattr(config, name)}")
        self.cache = ComposeCache(config.cache or None)
        self.stats = ComposeStats()
        self._composer = None

    @property
    def query_captions(self) -> str | None:
        return "final_caption"

    @property
    def target_captions(self) -> str | None:
        return "final_caption" if self.config.caption_weight > 0 else None

    def on_load(self, folder: Path) -> None:
        from cirlab.methods.caption_compose.composer import ComposeCache

        if not self.config.cache:
            self.cache = ComposeCache(Path(folder) / "cache" / "compose.jsonl")

    def notes(self) -> dict:
        import dataclasses

        return {"composer": self.config.composer.value, "model": self._composer.model_id if self._composer else "",
                **dataclasses.asdict(self.stats)}

    @property
    def composer(self):
        """The composer backend, built at first use (a checkpoint loads without a server or a model)."""
        if self._composer is None:
            from cirlab.methods.caption_compose.composer import make_composer

            c = self.config
            self._composer = make_composer(c.composer, c.composer_model, c.composer_base_url, c.oracle_root,
                                           c.imperfection, c.max_tokens, c.temperature, str(self.device))
        return self._composer

    def describe(self, references: list, texts: list) -> list:
        """`samples` target descriptions per query, from the cache or the composer."""
        from cirlab.methods.caption_compose.composer import ComposeItem, compose

        items = [ComposeItem(r.image, r.caption, t) for r, t in zip(references, texts)]
        return compose(items, self.composer, self.cache, self.config.samples, stats=self.stats)

    def encode_query(self, images, texts, references=None) -> torch.Tensor:
        if references is None or len(references) != len(texts):
            raise CirlabError("caption_compose composes from a description of each reference image: pass "
                              "references= (one types.Reference per query; `cirlab caption` writes descriptions)")
        flat = [d for ds in self.describe(references, texts) for d in ds]
        q = self.text_feature(flat).view(len(texts), self.config.samples, -1).mean(1)  # (B, D)
        w = self.config.image_weight
        if w > 0:
            q = (1 - w) * self.normalise(q) + w * self.image_feature(images)
        return self.normalise(q)

    def _encode_target(self, images, captions) -> torch.Tensor:
        image = self.image_feature(images)  # (N, D)
        w = self.config.caption_weight
        if w == 0:
            return image
        return (1 - w) * image + w * self.text_feature(captions)
