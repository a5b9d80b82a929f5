"""csmcir's ablation grid (`cirlab ablate csmcir`): each row is the change it makes to csmcir's config defaults.

The reference row is csmcir's defaults (memory bank off); the bank rows turn on cirlab's entropy reading of the
paper's bank and change one thing of it (selection rule, margin, consistency, loss term, warm-up), the others change
the symmetric target tower (image-only, as SPRC-like methods) or the MCoT final captions (one level, none)."""
ROWS = [
    {},  # csmcir's defaults: the bank off
    {"memory_bank": {"mode": "entropy"}},  # cirlab's reading of the paper's bank; the rows below change one thing
    {"memory_bank": {"mode": "fifo"}},
    {"memory_bank": {"mode": "random"}},
    {"memory_bank": {"mode": "hardest"}},
    {"memory_bank": {"mode": "sampled"}},
    {"memory_bank": {"mode": "entropy", "semi_hard_margin": 0.05}},
    {"memory_bank": {"mode": "entropy", "consistency": "ema"}},
    {"memory_bank": {"mode": "entropy", "term": "separate", "weight": 0.5}},
    {"memory_bank": {"mode": "entropy", "warmup_epochs": 1.0}},
    {"target_tower": "image_only"},
    {"captions": "single_level"},
    {"captions": "none"},
]
FIELDS = ("target_tower", "captions", "memory_bank")  # the columns the ablation table shows
