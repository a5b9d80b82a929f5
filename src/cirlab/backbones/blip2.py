"""BLIP-2 retrieval model (transformers Blip2ForImageTextRetrieval): ViT, Q-Former with learned query tokens.

The Q-Former is exposed three ways, as Blip2ForImageTextRetrieval uses it: image-only (query tokens cross-attend to
the ViT patches), text-only (the text tokens alone, CLS pooled), and joint (query tokens and text tokens in one
sequence, cross-attending to the patches), which is what composed-query methods such as CSMCIR build on.

Text runs unpadded ("packed") through the text-only and joint Q-Former: its linear layers, layer norms and feed-forward
blocks see only the query tokens and the batch's real text tokens; self-attention runs in the padded layout with
the padding masked out as keys. Hidden states at padding positions come back as zeros (every caller pools under the
attention mask). In eval mode the outputs and gradients equal transformers' padded forward within float rounding
(tests/test_backbones.py); in training, dropout draws its masks over fewer rows, so a run differs from the padded
one by its random numbers. On the synthetic world a modification text averages 11 real tokens in batches padded
to 22 and a caption 20 in 28. `packed_text = False` on an instance runs transformers' own forward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cirlab.backbones.base import Backbone, unpack_rows


class Blip2Backbone(Backbone):
    kind = "blip2"
    processor_type = "BlipImageProcessor"
    hf_class = "Blip2ForImageTextRetrieval"

    OPTIONS_FILE = "cirlab_backbone.json"
    packed_text = True

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
        if self.packed_text:
            hidden = _packed_qformer(m.qformer, embeds, tokens["attention_mask"])  # (B, L, Dq)
        else:
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
        if self.packed_text:
            return _packed_qformer(m.qformer, m.embeddings(input_ids=tokens["input_ids"]), tokens["attention_mask"],
                                   queries, patches)
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


def _packed_qformer(qformer, embeds: torch.Tensor, mask: torch.Tensor, queries: torch.Tensor | None = None,
                    patches: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' Blip2QFormerModel forward on [query tokens; text] with the text unpadded: `embeds` (B, L, Dq)
    word and position embeddings, `mask` (B, L), optional `queries` (B, Q, Dq) that cross-attend to `patches`
    (B, P, Dv) in the layers that have cross-attention. Returns the hidden states (B, Q + L, Dq), zeros at padding."""
    b, length = mask.shape
    q = 0 if queries is None else queries.shape[1]
    total, dev = q + length, embeds.device
    real = mask.reshape(-1).nonzero().squeeze(1)  # the real text tokens among the (B, L) positions
    rows = (real // length) * total + q + real % length  # ... and their rows in the (B, Q + L) layout
    x = embeds.reshape(b * length, -1).index_select(0, real)
    if q:
        rows = torch.cat([(torch.arange(b, device=dev)[:, None] * total + torch.arange(q, device=dev)).reshape(-1),
                          rows])
        x = torch.cat([queries.reshape(b * q, -1).to(x.dtype), x])
    keys = torch.cat([mask.new_ones(b, q), mask], dim=1).bool()[:, None, None, :]  # (B, 1, 1, Q + L)
    x = qformer.dropout(qformer.layernorm(x))
    for layer in qformer.encoder.layer:
        x = layer.attention.output(_packed_attention(layer.attention.attention, x, rows, b, total, keys), x)
        xq, xt = x[:b * q], x[b * q:]
        if q:
            if layer.has_cross_attention:
                cross = layer.crossattention
                xq = cross.output(_cross_attention(cross.attention, xq.view(b, q, -1), patches), xq)
            xq = layer.feed_forward_chunk_query(xq)
        x = torch.cat([xq, layer.feed_forward_chunk(xt)]) if q else layer.feed_forward_chunk(xt)
    return unpack_rows(x, rows, b, total).view(b, total, -1)


def _heads(t: torch.Tensor, b: int, n: int, att) -> torch.Tensor:
    return t.view(b, n, att.num_attention_heads, att.attention_head_size).transpose(1, 2)


def _packed_attention(att, x: torch.Tensor, rows: torch.Tensor, b: int, total: int, keys: torch.Tensor):
    """Blip2QFormerMultiHeadAttention (self) on packed rows: projections on the rows, attention padded."""
    q, k, v = (_heads(unpack_rows(f(x), rows, b, total), b, total, att) for f in (att.query, att.key, att.value))
    return _attend(att, q, k, v, keys).index_select(0, rows)


def _cross_attention(att, xq: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """Blip2QFormerMultiHeadAttention (cross) of the query tokens (B, Q, Dq) to every patch: (B * Q, Dq)."""
    b, q, p = xq.shape[0], xq.shape[1], patches.shape[1]
    patches = patches.to(xq.dtype)
    return _attend(att, _heads(att.query(xq), b, q, att), _heads(att.key(patches), b, p, att),
                   _heads(att.value(patches), b, p, att))


def _attend(att, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor | None = None):
    """`att`'s scaled dot-product attention (its dropout in training) over heads (B, H, N, d): (B * N, H * d)."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys, scale=att.scaling,
                                         dropout_p=att.attention_dropout if att.training else 0.0)
    return out.transpose(1, 2).reshape(q.shape[0] * q.shape[2], -1)
