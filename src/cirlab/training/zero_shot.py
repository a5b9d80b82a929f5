"""Zero-shot training of `mapcompose` and `pic2word`: never on a benchmark's triplets.

Stage I (mapping) trains on the split's (image, caption) pairs: every gallery image that has a caption. Stage II
(composing; methods with adapters, when `triplets` > 0) trains on triplets synthesised from the same pairs
(training/synthesis.py), with the hard-negative pool of every captioned image. The CLIP encoders are frozen
throughout, so each image's vision tokens are computed once (FrozenFeatureStore) and shared by both stages.
When stage II's config sets `steps_per_epoch`, each of its epochs takes exactly that many steps whatever the
number of triplets (a small set is repeated), so that triplet counts compare at equal compute.

Each stage keeps its resumable loop state in `<out>.train/stage1` and `<out>.train/stage2`; the synthetic triplets
are written to `<out>.train/synthetic_triplets.jsonl` for inspection; the checkpoint folder `out` is written
after each stage (stage I's model is a complete zero-shot model by itself: compose by the template alone).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from cirlab.backbones import load_backbone
from cirlab.data.images import PixelStore
from cirlab.data.readers import Split, read_split
from cirlab.errors import CirlabError
from cirlab.methods import TrainingKind, build_model, method_class
from cirlab.training.data import FrozenFeatureStore, PairSource, TripletSource
from cirlab.training.loop import TrainConfig, fit
from cirlab.training.synthesis import RULES, synthesize_triplets


def world_vocab(data_root) -> dict:
    """The synthetic world's attribute words and position phrases (the swap rule's vocabulary classes)."""
    from cirlab.data.synth.world import CELLS, SIZES

    info = Path(data_root) / "synth" / "world.json"
    if not info.exists():
        raise CirlabError(f"no synthetic world at {data_root} (missing {info}); give a vocabulary for other data")
    world = json.loads(info.read_text())
    return {"colour": list(world["colours"]), "shape": list(world["shapes"]), "size": list(SIZES),
            "position": list(CELLS)}


def _pool_features(model, store, names: list, chunk: int = 512) -> torch.Tensor:
    feats = []
    with torch.no_grad():
        for lo in range(0, len(names), chunk):
            feats.append(model.encode_target(store.pixels(names[lo:lo + chunk])))
    return torch.cat(feats)


def train_zero_shot(method: str, data_root, backbone, out, stage1: TrainConfig, stage2: TrainConfig | None = None,
                    method_config: dict | None = None, triplets: int = 500, dataset: str = "synth",
                    split: str = "train", vocab: dict | None = None, seed: int = 0, log=print,
                    stage1_from=None, min_match: float = 0.8, rules: tuple = RULES, on_epoch=None) -> dict:
    """Train `method` zero-shot from `backbone` (a CLIP id or folder); returns the summary written to
    `<out>.train/zero_shot.json`. `stage1_from`: a checkpoint of the same method whose stage I to start stage II
    from (stage I is then skipped; ablation rows share one). `on_epoch(model, out)` runs after each stage-II
    epoch, once the checkpoint is written."""
    cls = method_class(method)
    if cls.training is not TrainingKind.ZERO_SHOT:
        raise CirlabError(f"method {method!r} is not a zero-shot method; use train_method")
    out = Path(out)
    work = out.with_name(out.name + ".train")
    data = read_split(dataset, data_root, split)
    names = sorted(n for n in data.gallery if n in data.captions)
    if not names:
        raise CirlabError(f"{dataset}/{split} has no captioned images to train {method} on")
    torch.manual_seed(stage1.seed)
    model = build_model(method, load_backbone("clip", backbone), (method_config or {}) | {"stage": "mapping"})
    store = FrozenFeatureStore(PixelStore(data.gallery, model.preprocess), model.frozen_image_stage())
    summary = {"method": method, "pairs": len(names)}
    if stage1_from is not None:
        _load_stage1(model, stage1_from)
        summary["stage1_from"] = str(stage1_from)
    else:
        log(f"{method}: stage I on {len(names)} (image, caption) pairs ({stage1.epochs} epochs)")
        result = fit(model, PairSource(names, data.captions, store), stage1, work / "stage1",
                     desc=f"{method} stage I")
        summary["stage1_losses"], summary["stage1_seconds"] = result.losses, round(result.seconds, 1)
    model.save(out)
    if stage2 is not None and triplets > 0 and len(model.adapters):
        syn = synthesize_triplets({n: data.captions[n] for n in names}, triplets, vocab or world_vocab(data_root),
                                  seed=seed, min_match=min_match, rules=rules)
        _write_triplets(work / "synthetic_triplets.jsonl", syn, data.captions)
        summary |= _compose(model, syn, data, names, store, stage2, out, log, on_epoch)
    work.mkdir(parents=True, exist_ok=True)
    (work / "zero_shot.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _compose(model, syn, data: Split, names: list, store, stage2: TrainConfig, out: Path, log, on_epoch) -> dict:
    """Stage II on the synthetic triplets, the hard-negative pool being every captioned image; the summary."""
    model.set_stage("composing")
    source = TripletSource(Split(data.dataset, "synthetic", syn.queries, data.gallery, data.captions), store)
    if stage2.steps_per_epoch:  # a fixed step budget whatever the number of triplets: repeat a small set
        source = _Repeated(source, math.ceil(stage2.steps_per_epoch * stage2.batch_size / len(source)))
    steps = (stage2.steps_per_epoch or max(1, len(source) // stage2.batch_size)) * stage2.epochs
    model.set_negative_pool(_pool_features(model, store, names), names, [data.captions[n] for n in names], steps)
    log(f"{model.name}: stage II on {len(syn.queries)} synthetic triplets ({syn.rules}; {syn.drawn} edits drawn; "
        f"{stage2.epochs} epochs)")

    def export(_):
        pool, model.pool = model.pool, None  # the pool is training state, never saved
        model.save(out)
        model.pool = pool
        if on_epoch is not None:
            on_epoch(model, out)

    work = out.with_name(out.name + ".train")
    result = fit(model, source, stage2, work / "stage2", export=export, desc=f"{model.name} stage II")
    model.pool = None
    model.save(out)
    return {"triplets": len(syn.queries), "rules": syn.rules, "edits_drawn": syn.drawn,
            "mean_match_f1": round(sum(syn.match_f1) / len(syn.match_f1), 4), "stage2_losses": result.losses,
            "stage2_steps": result.steps, "stage2_seconds": round(result.seconds, 1)}


class _Repeated:
    """A batch source seen `times` over per epoch (fit shuffles the repeats together)."""

    def __init__(self, source, times: int):
        self.source, self.times = source, max(1, times)

    def __len__(self) -> int:
        return len(self.source) * self.times

    def batch(self, indices):
        return self.source.batch([i % len(self.source) for i in indices])


def _load_stage1(model, folder) -> None:
    """Copy a saved model's stage-I weights (token learner, injection, temperature) into `model`."""
    from cirlab.methods import load_model

    done = load_model(folder)
    if done.name != model.name:
        raise CirlabError(f"{folder} holds a {done.name} checkpoint, not {model.name}")
    for part in ("learner", "injection"):
        getattr(model, part).load_state_dict(getattr(done, part).state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(done.logit_scale)


def _write_triplets(path: Path, syn, captions: dict) -> None:
    from cirlab.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"key": q.key, "reference": q.reference, "text": q.text, "target": q.targets[0],
                                "reference_caption": captions[q.reference], "target_caption": captions[q.targets[0]],
                                "match_f1": f1, "also_fits": list(q.targets[1:])}) + "\n"
                    for q, f1 in zip(syn.queries, syn.match_f1))
    write_atomic(path, lambda f: f.write(lines.encode()))
