"""A tiny StableDiffusionInstructPix2PixPipeline built from configs (random weights), saved to a folder."""
from __future__ import annotations


def build_tiny_ip2p(out) -> str:
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerAncestralDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from cirlab.backbones.tokenizer import clip_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, in_channels=8, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=77, bos_token_id=49406,
                                        eos_token_id=49407, pad_token_id=49407))
    pipe = StableDiffusionInstructPix2PixPipeline(vae=vae, text_encoder=text, tokenizer=clip_tokenizer(77), unet=unet,
                                                  scheduler=EulerAncestralDiscreteScheduler(), safety_checker=None,
                                                  feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(out))
    return str(out)
