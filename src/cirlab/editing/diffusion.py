"""An instruction-driven diffusion editor: diffusers' StableDiffusionInstructPix2PixPipeline by id or folder.

The reference image and the modification text go in as image and instruction; the pipeline's output, at the
reference's size rounded down to a multiple of 8, is the pseudo-target. Every image gets its own generator,
seeded from (seed, query key, sample index), so a resumed or repeated run makes the same pixels; steps, both
guidance scales and that per-image seed are recorded in each manifest record.
"""
from __future__ import annotations

import hashlib

from cirlab.data.images import open_image
from cirlab.errors import CirlabError

DEFAULT_MODEL = "timbrooks/instruct-pix2pix"


def image_seed(seed: int, key: str, sample: int) -> int:
    return int(hashlib.sha1(f"{seed}/{key}/{sample}".encode()).hexdigest()[:8], 16)


class DiffusersEditor:
    name = "diffusers"

    def __init__(self, model: str = DEFAULT_MODEL, steps: int = 20, guidance_scale: float = 7.5,
                 image_guidance_scale: float = 1.5, seed: int = 0, device: str = "cpu"):
        try:
            import torch
            from diffusers import StableDiffusionInstructPix2PixPipeline
        except ImportError:
            raise CirlabError("the diffusers editor needs the diffusers package (pip install 'cirlab[edit]')") \
                from None
        from cirlab.backbones.base import resolve_source

        if steps < 1:
            raise CirlabError(f"steps must be at least 1, got {steps}")
        src = resolve_source(model)
        try:
            self.pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
                src, safety_checker=None, requires_safety_checker=False).to(device)
        except (OSError, ValueError) as e:
            raise CirlabError(f"cannot load an InstructPix2Pix pipeline from {model}: {e}") from None
        self.pipe.set_progress_bar_config(disable=True)
        self.torch, self.device = torch, device
        self.model_id = str(model)
        self.steps, self.guidance_scale, self.image_guidance_scale, self.seed = (steps, guidance_scale,
                                                                                 image_guidance_scale, seed)

    def options(self) -> dict:
        return {"steps": self.steps, "guidance_scale": self.guidance_scale,
                "image_guidance_scale": self.image_guidance_scale}

    def edit_batch(self, items: list, split) -> list:
        """[(query, sample)] -> [(image, info)]."""
        refs, seeds = [], []
        for q, k in items:
            img = open_image(split.gallery[q.reference]).convert("RGB")
            w, h = img.size
            if w < 8 or h < 8:
                raise CirlabError(f"image {q.reference!r} is too small to edit ({w}x{h})")
            refs.append(img.crop((0, 0, w - w % 8, h - h % 8)))
            seeds.append(image_seed(self.seed, q.key, k))
        gens = [self.torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        if len({r.size for r in refs}) == 1:
            images = self._run([q.text for q, _ in items], refs, gens)
        else:  # the pipeline batches only images of one size
            images = [self._run([q.text], [r], [g])[0] for (q, _), r, g in zip(items, refs, gens)]
        return [(img, {"seed": s}) for img, s in zip(images, seeds)]

    def _run(self, texts: list, refs: list, gens: list) -> list:
        out = self.pipe(texts, image=refs, num_inference_steps=self.steps, guidance_scale=self.guidance_scale,
                        image_guidance_scale=self.image_guidance_scale, generator=gens, output_type="pil")
        return out.images
