"""A tiny transformers image-text-to-text model (LLaVA classes) built from a config, for the hf captioning backend.

Character-level tokenizer (so the vocabulary is 105 entries and a step is cheap), a 1-layer CLIP vision tower and a
2-layer Llama. `build_tiny_vlm(folder, answer)` can overfit it for a few steps to answer every image with one fixed
text, which makes the success path of the backend checkable without any download.
"""
from __future__ import annotations

import string

TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant: {% endif %}")


def char_tokenizer():
    """(tokenizer, vocab): one token per printable character, plus <pad> <s> </s> <unk> <image>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["<pad>", "<s>", "</s>", "<unk>", "<image>"] + sorted(set(string.printable)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", additional_special_tokens=["<image>"])
    return tok, vocab


def build_tiny_lm(folder):
    """A 2-layer Llama causal LM with the character tokenizer and a chat template, untrained (its answers are
    nonsense): the hf composer's loading, batching and decoding, checkable without a download."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, _ = char_tokenizer()
    tok.chat_template = TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                         max_position_embeddings=2048, pad_token_id=0, bos_token_id=1,
                                         eos_token_id=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def build_tiny_vlm(folder, answer: str | None = None, images: list | None = None, steps: int = 110):
    import torch
    from PIL import Image
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    from cirlab.captioning.prompt import messages

    tok, vocab = char_tokenizer()
    proc = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                             crop_size={"height": 32, "width": 32}),
                          tokenizer=tok, patch_size=16, vision_feature_select_strategy="default",
                          chat_template=TEMPLATE, num_additional_image_tokens=1)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=2048,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2),
        image_token_index=vocab["<image>"], vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(cfg)
    if answer is not None:
        pics = [Image.open(p).convert("RGB") for p in images]
        prompt = proc.apply_chat_template(messages(), add_generation_prompt=True, tokenize=False)
        enc = proc(text=[prompt + answer + "</s>"] * len(pics), images=[[p] for p in pics], return_tensors="pt")
        start = proc(text=[prompt], images=[[pics[0]]], return_tensors="pt")["input_ids"].shape[1]
        labels = enc["input_ids"].clone()
        labels[:, :start] = -100
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            loss = model(**enc, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder
