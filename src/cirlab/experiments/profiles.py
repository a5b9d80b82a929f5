"""The demo's profiles: the world size, the tiny backbones, and each method's schedule and settings for `cirlab
demo` (`default`), `cirlab demo --profile full` and `cirlab demo --quick`; ablations start from `full`.

`default` is `full` with shorter shared stages, so that the demo fits in 8 minutes on 2 cores of an Intel Xeon (459
s; 624-801 s on an AMD EPYC, whose products are slower): CLIP pretraining 2 epochs (full: 3), the Q-Former's pretraining
1 (full: 2), the zero-shot methods' stage I 1 (full: 2). Every method that the demo compares with another keeps its
own schedule: the triplet methods 3 whole epochs each, TMCIR's stage 1 on 16,000 pseudo-targets, mapcompose's stage
II 10 epochs. A shared stage shortened changes every method's starting point alike; the comparisons it changes are
measured over seeds (docs/results.md).

On the AMD EPYC the 8 minutes need the triplet schedules cut, and that changes the ranking: 2 epochs of 76% of the
triplets each (csmcir 167 of its 220 groups an epoch, the others 190 of 250 batches), TMCIR's stage 1 on the first
8,000 triplets and mapcompose's stage II 5 epochs took 461 s from a fresh clone there, but over seeds 0-2 TMCIR fell
below the combiner (R@1 -3.56 [-6.50, -0.61], R@10 -9.17, Rsubset@1 -8.56; a tie with the schedules whole), so it is
not the default (docs/results/demo_schedule_trials/, trial H).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class DemoProfile:
    world: str
    # kind -> {"config": tiny-config overrides, "pretrain": TrainConfig fields, optional "init_from": a kind whose
    # pretrained weights it starts from (blip2 from clip: CLIP's ViT, frozen, under a fresh Q-Former)}
    backbones: dict
    train: dict  # TrainConfig fields shared by the trained methods
    method_train: dict = field(default_factory=dict)  # method -> TrainConfig overrides
    method_config: dict = field(default_factory=dict)  # method -> method config
    # method -> TMCIR-style stage 1 before it trains: oracle pseudo-targets ("imperfection", "n" per triplet, optional
    # "limit": only the first that many train triplets), then
    # intent alignment of the CLIP ("unfreeze", "train": TrainConfig fields); the method starts from the result
    stage1: dict = field(default_factory=dict)
    # zero-shot method -> {"stage1": TrainConfig fields (mapping), "stage2": TrainConfig fields (composing),
    # "triplets": synthetic triplets for stage II}; trained on the world's (image, caption) pairs only
    zero_shot: dict = field(default_factory=dict)
    # seed method -> the baseline its R@1 difference (with a paired interval over queries) is reported against
    closest: dict = field(default_factory=lambda: dict(CLOSEST_BASELINE))
    methods: tuple = ()  # the methods the demo trains and evaluates (registered names)
    # step -> estimated seconds with two lanes side by side on 2 cores (keys as in results.json's seconds.steps):
    # only the order in which the lanes run depends on them (demo._order), never what they compute
    seconds: dict = field(default_factory=dict)


DEMO_METHODS = ("image_only", "text_only", "sum", "combiner", "pic2word", "csmcir", "tmcir", "mapcompose")
# the default demo's seconds.steps, seed 0, Intel Xeon, 2 lanes on 2 cores (docs/results/demo_default_profile_s0.json)
DEFAULT_SECONDS = {"stage 1 tmcir": 60, "tmcir": 166, "pretrain blip2": 60, "csmcir": 148, "combiner": 169,
                   "mapcompose": 67, "pic2word": 27, "image_only": 3, "sum": 3, "text_only": 3}
# the full profile's longer stages scaled by their epochs: the Q-Former's 2 (1), stage I's 2 (1: 36 of mapcompose's
# 67 s, 24 of pic2word's 27)
FULL_SECONDS = DEFAULT_SECONDS | {"pretrain blip2": 120, "mapcompose": 103, "pic2word": 51}
CLOSEST_BASELINE = {"csmcir": "combiner", "tmcir": "combiner", "mapcompose": "pic2word"}
ZERO_SHOT = {"mapcompose": {"stage1": {"epochs": 2, "batch_size": 128, "lr": 1e-3, "warmup_steps": 20},
                             "stage2": {"epochs": 10, "batch_size": 64, "lr": 3e-3, "warmup_steps": 10},
                             "triplets": 2000},
             "pic2word": {"stage1": {"epochs": 2, "batch_size": 128, "lr": 1e-3, "warmup_steps": 20},
                          "stage2": {}, "triplets": 0}}
_QUICK_STAGE1 = ZERO_SHOT["mapcompose"]["stage1"] | {"epochs": 1, "steps_per_epoch": 30}  # a smoke test
QUICK_ZERO_SHOT = {"mapcompose": {"stage1": _QUICK_STAGE1, "triplets": 500,
                                  "stage2": ZERO_SHOT["mapcompose"]["stage2"] | {"epochs": 2}},
                   "pic2word": {"stage1": _QUICK_STAGE1, "stage2": {}, "triplets": 0}}
PROFILES = {
    "full": DemoProfile(
        world="default", methods=DEMO_METHODS,
        backbones={
            "clip": {"config": {"patch_size": 16, "width": 128, "layers": 4, "dim": 128},
                     "pretrain": {"epochs": 3, "batch_size": 128, "lr": 1e-3, "warmup_steps": 50}},
            "blip2": {"init_from": "clip", "config": {},
                      "pretrain": {"epochs": 2, "batch_size": 128, "lr": 1e-3, "warmup_steps": 50}}},
        train={"epochs": 3, "batch_size": 64, "lr": 1e-3, "backbone_lr": 1e-4, "warmup_steps": 50},
        method_train={"csmcir": {"epochs": 3, "batch_size": 16, "group_by_reference": True, "backbone_lr": 1e-3}},
        stage1={"tmcir": {"imperfection": 0.1, "n": 1, "unfreeze": "all",
                          "train": {"epochs": 1, "batch_size": 64, "lr": 1e-4, "warmup_steps": 20}}},
        zero_shot=ZERO_SHOT, seconds=FULL_SECONDS),
    "quick": DemoProfile(
        # a smoke test: the test suite's own tiny CLIP and Q-Former (tests/conftest.py builds them through this
        # profile, so that the demo's test starts from them)
        world="small", methods=DEMO_METHODS,
        backbones={
            "clip": {"config": {"patch_size": 16, "width": 64, "layers": 2, "dim": 64},
                     "pretrain": {"epochs": 2, "batch_size": 128, "lr": 1e-3, "warmup_steps": 10}},
            "blip2": {"init_from": "clip", "config": {"num_query_tokens": 4, "qformer_layers": 1},
                      "pretrain": {"epochs": 2, "batch_size": 64, "steps_per_epoch": 15, "lr": 1e-3,
                                   "warmup_steps": 5}}},
        train={"epochs": 2, "batch_size": 64, "lr": 1e-3, "backbone_lr": 1e-4, "warmup_steps": 20},
        # the combiner and tmcir stop at 40 steps an epoch (a smoke test's budget: the combiner stays far above
        # chance, R@10 about 6 times the test's threshold)
        method_train={"csmcir": {"epochs": 5, "batch_size": 16, "group_by_reference": True, "backbone_lr": 1e-3},
                      "combiner": {"steps_per_epoch": 40}, "tmcir": {"epochs": 1, "steps_per_epoch": 40}},
        stage1={"tmcir": {"imperfection": 0.1, "n": 1, "unfreeze": "all", "limit": 1920,  # the 30 steps' triplets
                          "train": {"epochs": 1, "batch_size": 64, "lr": 1e-4, "warmup_steps": 20,
                                    "steps_per_epoch": 30}}},
        zero_shot=QUICK_ZERO_SHOT),
}

_FULL = PROFILES["full"]
PROFILES = {"default": replace(
    _FULL,
    backbones={"clip": _FULL.backbones["clip"] | {"pretrain": _FULL.backbones["clip"]["pretrain"] | {"epochs": 2}},
               "blip2": _FULL.backbones["blip2"] | {"pretrain": _FULL.backbones["blip2"]["pretrain"] | {"epochs": 1}}},
    zero_shot={name: spec | {"stage1": spec["stage1"] | {"epochs": 1}} for name, spec in ZERO_SHOT.items()},
    seconds=DEFAULT_SECONDS),
    **PROFILES}
