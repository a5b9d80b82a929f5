"""BLIP-2 retrieval model (transformers Blip2ForImageTextRetrieval): ViT, Q-Former with learned query tokens.

The Q-Former is exposed three ways, as Blip2ForImageTextRetrieval uses it: image-only (query tokens cross-attend to
the ViT patches), text-only (the text tokens alone, CLS pooled), and joint (query tokens and text tokens in one
sequence, cross-attending to the patches), which is what composed-query methods such as CSMCIR build on.
"""
from __future__ import annotations

import torch

from cirlab.backbones.base import Backbone


class Blip2Backbone(Backbone):
    kind = "blip2"
    processor_type = "BlipImageProcessor"
    hf_class = "Blip2ForImageTextRetrieval"

    OPTIONS_FILE = "cirlab_backbone.json"

    def __init__(self, *args, text_pool: str = "cls", **kwargs):
        super().__init__(*args, **kwargs)
        if text_pool not in ("cls", "mean"):
            raise ValueError(f"text_pool must be cls or mean, got {text_pool!r}")
        # "cls" reads the first text position, as BLIP-2 does; "mean" averages the text tokens, which a Q-Former
        # trained from scratch needs: at initialisation the first position (the same start token for every text)
        # barely depends on the rest of the text, and contrastive training from it collapses to chance.
        self.text_pool = text_pool
        # Blip2ForImageTextRetrieval keeps no temperature; the wrapper holds one for contrastive training.
        self._logit_scale = torch.nn.Parameter(torch.tensor(2.659))

    @classmethod
    def from_pretrained(cls, source) -> "Blip2Backbone":
        import json
        from pathlib import Path

        bb = super().from_pretrained(source)
        options = Path(bb.source) / cls.OPTIONS_FILE
        if options.exists():
            bb.text_pool = json.loads(options.read_text()).get("text_pool", "cls")
        return bb

    def save_pretrained(self, folder) -> None:
        import json
        from pathlib import Path

        super().save_pretrained(folder)
        (Path(folder) / self.OPTIONS_FILE).write_text(json.dumps({"text_pool": self.text_pool}) + "\n")

    @property
    def dim(self) -> int:
        return self.model.config.image_text_hidden_size

    @property
    def num_query_tokens(self) -> int:
        return self.model.config.num_query_tokens

    @property
    def max_length(self) -> int:
        return self.model.config.qformer_config.max_position_embeddings

    def image_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        """ViT output tokens: (B, 1 + P, Dv)."""
        return self.model.vision_model(pixel_values=pixels).last_hidden_state

    def query_features(self, patches: torch.Tensor) -> torch.Tensor:
        """Query tokens after the Q-Former, projected, not normalised: (B, Q, D)."""
        m = self.model
        queries = m.query_tokens.expand(patches.shape[0], -1, -1)  # (B, Q, Dq)
        mask = torch.ones(patches.shape[:-1], dtype=torch.long, device=patches.device)
        out = m.qformer(query_embeds=queries, encoder_hidden_states=patches, encoder_attention_mask=mask)
        return m.vision_projection(out.last_hidden_state)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, Q, D): BLIP-2 image features are one vector per query token."""
        return self.query_features(self.image_patches(pixels))

    def encode_text(self, tokens: dict) -> torch.Tensor:
        """Text-only Q-Former, CLS (first position) projected: (B, D)."""
        m = self.model
        embeds = m.embeddings(input_ids=tokens["input_ids"])
        out = m.qformer(query_embeds=embeds, query_length=0, attention_mask=tokens["attention_mask"])
        hidden = out.last_hidden_state  # (B, L, Dq)
        if self.text_pool == "mean":
            mask = tokens["attention_mask"][..., None].to(hidden.dtype)
            return m.text_projection((hidden * mask).sum(1) / mask.sum(1))
        return m.text_projection(hidden[:, 0])

    def joint(self, patches: torch.Tensor, tokens: dict) -> torch.Tensor:
        """Query tokens and text in one Q-Former pass over the patches: hidden states (B, Q + L, Dq)."""
        m = self.model
        b = patches.shape[0]
        queries = m.query_tokens.expand(b, -1, -1)
        embeds = m.embeddings(input_ids=tokens["input_ids"], query_embeds=queries)  # (B, Q+L, Dq)
        q_mask = torch.ones(queries.shape[:-1], dtype=tokens["attention_mask"].dtype, device=patches.device)
        mask = torch.cat([q_mask, tokens["attention_mask"]], dim=1)
        enc_mask = torch.ones(patches.shape[:-1], dtype=torch.long, device=patches.device)
        out = m.qformer(query_embeds=embeds, query_length=queries.shape[1], attention_mask=mask,
                        encoder_hidden_states=patches, encoder_attention_mask=enc_mask)
        return out.last_hidden_state

    @property
    def logit_scale(self) -> torch.Tensor:
        return self._logit_scale
