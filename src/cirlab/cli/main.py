"""The `cirlab` command: parse arguments, build typed configs, call the library.

Errors a user can cause end with one line on stderr naming the file, field or value, and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cirlab.cli.args import DATASETS, JOINS
from cirlab.cli.args import json_arg as _json_arg
from cirlab.cli.engine import add_engine_options, add_engine_parsers
from cirlab.cli.research import add_research_parsers
from cirlab.errors import CirlabError


def _train_config(args, **extra):
    from cirlab.training.loop import TrainConfig

    if getattr(args, "group_by_reference", False):
        extra["group_by_reference"] = True
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, backbone_lr=args.backbone_lr,
                       grad_accum=args.grad_accum, amp=args.amp, seed=args.seed, device=args.device,
                       warmup_steps=args.warmup_steps, steps_per_epoch=args.steps_per_epoch,
                       progress=not args.no_progress, force_resume=getattr(args, "force", False), **extra)


def _add_train_options(p, epochs: int, batch_size: int, lr: float):
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr, help="learning rate of the method's own parameters")
    p.add_argument("--backbone-lr", type=float, default=1e-4, help="learning rate of fine-tuned backbone towers")
    p.add_argument("--warmup-steps", type=int, default=50)
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--steps-per-epoch", type=int, default=0, help="cap the steps of each epoch (0: no cap)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--resume", action="store_true", help="continue from the last complete epoch")
    p.add_argument("--force", action="store_true", help="with --resume: continue even when the schedule or the "
                                                        "method's settings differ from the saved run's")
    p.add_argument("--no-progress", action="store_true")


def cmd_synth(args) -> None:
    from cirlab.data.synth.generate import write_world
    from cirlab.experiments import machine

    if args.chains < 0:
        raise CirlabError(f"--chains must be at least 0, got {args.chains}")
    if args.workers is not None and args.workers < 1:
        raise CirlabError(f"--workers must be at least 1, got {args.workers}")
    root = write_world(args.out, seed=args.seed, size=args.size, progress=not args.no_progress, chains=args.chains,
                       workers=args.workers or machine.cores())
    extra = f", with {args.chains} multi-turn chains" if args.chains else ""
    print(f"wrote the synthetic world (seed {args.seed}, size {args.size}{extra}) to {root}")


def cmd_pretrain(args) -> None:
    from cirlab.training.pretrain import pretrain

    overrides = _json_arg(args.backbone_config, "--backbone-config")
    init = None
    if args.init_from:
        from cirlab.backbones.base import resolve_source

        init = resolve_source(args.init_from)
    out = pretrain(args.backbone, args.data, args.out, _train_config(args), overrides, resume=args.resume,
                   init_from=init)
    print(f"saved the pretrained {args.backbone} backbone to {out}")


def cmd_train(args) -> None:
    from cirlab.methods import TrainingKind, method_class
    from cirlab.training.train import train, train_method

    method_config = _json_arg(args.config, "--config")
    kind = method_class(args.method).training
    if kind is TrainingKind.ZERO_SHOT:
        _train_zero_shot(args, method_config)
        return
    if kind is TrainingKind.NONE:
        out = train(args.method, args.data_root, args.backbone, args.out, _train_config(args), method_config)
        print(f"{args.method} is zero-shot: saved its checkpoint to {out}")
        return
    kwargs = dict(method=args.method, data_root=args.data_root, backbone=args.backbone, out=args.out,
                  cfg=_train_config(args), method_config=method_config, dataset=args.dataset, resume=args.resume,
                  join=args.join, captions=args.captions, feature_cache=args.feature_cache)
    if args.nproc > 1:
        from cirlab.training.distributed import launch

        launch(train_method, args.nproc, args.device, **kwargs)
        log = Path(args.out).with_name(Path(args.out).name + ".train") / "metrics.jsonl"
        epochs = [json.loads(x)["epoch_loss"] for x in log.read_text().splitlines() if "epoch_loss" in x]
        print(f"trained {args.method} in {args.nproc} processes (global batch {args.nproc * args.batch_size}); "
              f"epoch losses: {', '.join(f'{x:.3f}' for x in epochs)}")
        print(f"checkpoint: {args.out}")
        return
    if args.nproc < 1:
        raise CirlabError(f"--nproc must be at least 1, got {args.nproc}")
    from cirlab.training.distributed import init_from_torchrun

    init_from_torchrun(args.device)  # under torchrun: join its group; otherwise one process
    result = train_method(**kwargs)
    losses = ", ".join(f"{x:.3f}" for x in result.losses)
    print(f"trained {args.method} for {result.epochs_done} epochs ({result.seconds:.0f} s); epoch losses: {losses}")
    print(f"checkpoint: {args.out}")


def _train_zero_shot(args, method_config) -> None:
    import dataclasses

    from cirlab.training.train import train

    if args.triplets < 0:
        raise CirlabError(f"--triplets must be at least 0, got {args.triplets}")
    stage1 = _train_config(args)
    stage2 = dataclasses.replace(stage1, epochs=args.stage2_epochs or stage1.epochs)
    summary = train(args.method, args.data_root, args.backbone, args.out, stage1, method_config,
                    {"stage2": stage2, "triplets": args.triplets, "seed": args.seed}, dataset=args.dataset)
    print(json.dumps(summary))
    print(f"checkpoint: {args.out}")


def _reference_option(args):
    return {"keep": False, "remove": True}.get(args.reference)


def cmd_eval(args) -> None:
    import cirlab
    from cirlab.evaluation.protocols import evaluate_benchmark, read_benchmark
    from cirlab.methods import checkpoint_identity

    ckpt = Path(args.checkpoint)
    if args.dataset == "synth" and args.split == "chains":
        return _eval_turns(args, ckpt)
    splits = read_benchmark(args.dataset, args.data_root, args.split, args.join)  # annotation errors come first
    for split in splits if args.limit else ():  # a quick look: the first N queries against the whole gallery
        split.queries = split.queries[:args.limit]
    if args.captions:
        from cirlab.data.readers import attach_captions

        for split in splits:
            attach_captions(split, args.captions)
    model = cirlab.load(ckpt, device=args.device)
    from cirlab.evaluation.per_query import write_records

    rerank, name = None, model.name
    if args.rerank:
        if args.rerank_k < 1:
            raise CirlabError(f"--rerank-k must be at least 1, got {args.rerank_k}")
        second = Path(args.rerank)
        rerank = (cirlab.load(second, device=args.device), args.rerank_k, second / "cache",
                  checkpoint_identity(second))
        name = f"{model.name} -> {rerank[0].name} (top {args.rerank_k})"
    metrics, records = evaluate_benchmark(model, args.dataset, splits, _reference_option(args), ckpt / "cache",
                                          checkpoint_identity(ckpt), progress=not args.no_progress, rerank=rerank)
    from cirlab.experiments.report import format_table

    print(format_table({name: metrics}, list(metrics)))
    out = Path(args.json) if args.json else ckpt / f"eval-{args.dataset}-{args.split}.json"
    per_query = per_query_path(out)
    notes = model.notes()
    if notes:
        print(f"{model.name}: {json.dumps(notes)}")
    out.write_text(json.dumps({"dataset": args.dataset, "split": args.split, "method": model.name,
                               "checkpoint": str(ckpt), "join": args.join, "reference": args.reference,
                               "query_limit": args.limit, "metrics": metrics, "per_query": per_query.name}
                              | ({"rerank": {"checkpoint": str(args.rerank), "method": rerank[0].name,
                                             "k": args.rerank_k}} if rerank else {})
                              | ({"notes": notes} if notes else {}), indent=1) + "\n")
    write_records(per_query, records)
    print(f"wrote {out} and {per_query} (one line per query, for `cirlab compare`)")


def _eval_turns(args, ckpt: Path) -> None:
    """`cirlab eval --split chains`: R@1 and R@10 at each turn of the world's multi-turn chains, both modes."""
    import cirlab
    from cirlab.data.readers import read_chains
    from cirlab.evaluation.turns import evaluate_turns
    from cirlab.methods import checkpoint_identity

    split, chains = read_chains(args.data_root)
    if args.limit:
        chains = chains[:args.limit]
    model = cirlab.load(ckpt, device=args.device)
    turns = evaluate_turns(model, split, chains, ckpt / "cache", checkpoint_identity(ckpt), not args.no_progress)
    print(f"| {model.name}: reference of turn t > 1 | " + " | ".join(f"{t} R@1 | {t} R@10" for t in turns["true"])
          + " |")
    for mode, label in (("true", "the true previous target"), ("predicted", "the previous turn's top 1")):
        print(f"| {label} | " + " | ".join(f"{m['R@1']:.2f} | {m['R@10']:.2f}" for m in turns[mode].values()) + " |")
    out = Path(args.json) if args.json else ckpt / "eval-synth-chains.json"
    out.write_text(json.dumps({"dataset": "synth", "split": "chains", "method": model.name, "checkpoint": str(ckpt),
                               "chains": len(chains), "turns": turns}, indent=1) + "\n")
    print(f"wrote {out}")


def per_query_path(result: Path) -> Path:
    """The per-query file written beside a result file: eval.json -> eval.per_query.jsonl."""
    return result.with_name(result.stem + ".per_query.jsonl")


def cmd_score(args) -> None:
    from cirlab.evaluation.scoring import score

    metrics = score(args.dataset, args.data_root, args.split, args.predictions, args.subset_predictions, args.join)
    from cirlab.experiments.report import format_table

    print(format_table({Path(args.predictions).name: metrics}, list(metrics)))
    if args.json:
        print(json.dumps(metrics))


def cmd_submit(args) -> None:
    import cirlab
    from cirlab.evaluation.submission import TEST_SPLITS, check_submission, write_submission

    model = cirlab.load(args.checkpoint, device=args.device)
    files = write_submission(model, args.dataset, args.data_root, args.out, args.split,
                             progress=not args.no_progress)
    split = args.split or TEST_SPLITS[args.dataset]
    problems, notes = check_submission(args.dataset, args.data_root, split, files)
    for n in notes:
        print(f"note: {n}")
    if problems:
        raise CirlabError(f"the written files would be rejected: {problems[0]} ({len(problems)} problems)")
    print("wrote and checked: " + ", ".join(map(str, files)))


def cmd_check_submission(args) -> int:
    from cirlab.evaluation.submission import check_submission

    problems, notes = check_submission(args.dataset, args.data_root, args.split, args.files)
    for n in notes:
        print(f"note: {n}")
    if not problems:
        print("ok")
        return 0
    for p in problems[:20]:
        print(p)
    print(f"{len(problems)} problems" + (" (first 20 shown)" if len(problems) > 20 else ""))
    return 1


def cmd_data_check(args) -> int:
    from cirlab.data.check import check_data

    report = check_data(args.dataset, args.data_root)
    print("\n".join(report.lines()))
    return 0 if report.ok else 1


def cmd_caption(args) -> None:
    from cirlab.captioning.backends import make_backend
    from cirlab.captioning.run import caption_split

    if args.backend == "oracle" and args.dataset not in ("synth", "synth-circo"):
        raise CirlabError(f"the oracle captioner knows only the synthetic world; use --backend hf or openai for "
                          f"{args.dataset}")
    from functools import partial

    factory = partial(make_backend, args.backend, args.dataset, args.data_root, latency_s=args.oracle_latency,
                      model=args.model, device=args.device, max_new_tokens=args.max_new_tokens,
                      base_url=args.base_url, api_key=args.api_key, timeout_s=args.timeout, retries=args.retries,
                      concurrency=args.concurrency)
    stats = caption_split(args.dataset, args.data_root, args.split, factory(), args.out, args.batch_size,
                          progress=not args.no_progress, category=args.category, engine=args.engine,
                          backend_factory=factory, address=args.ray_address, concurrency=args.concurrency_ray,
                          limit=args.limit)
    summary = (f"{stats.images} images: {stats.cached} already cached, {stats.captioned} captioned "
               f"({stats.repaired} after a repair prompt, {stats.fallbacks} fell back to a partial answer), "
               f"{stats.failures} failed")
    if stats.images and not stats.cached and not stats.captioned:
        raise CirlabError(f"{summary}: no image was captioned, so no cache was written; the backend's errors are "
                          "above")
    print(f"{summary}; cache: {args.out}")


def cmd_edit(args) -> None:
    from cirlab.editing.run import edit_split

    from functools import partial

    if args.backend == "oracle":
        from cirlab.editing.oracle import OracleEditor

        if args.dataset != "synth":
            raise CirlabError(f"the oracle editor knows only the synthetic world, not {args.dataset}")
        factory = partial(OracleEditor, args.data_root, args.split, args.imperfection, args.seed,
                          args.oracle_latency)
    else:
        from cirlab.editing.diffusion import DEFAULT_MODEL, DiffusersEditor

        factory = partial(DiffusersEditor, args.model or DEFAULT_MODEL, args.steps, args.guidance_scale,
                          args.image_guidance_scale, args.seed, args.device)
    stats = edit_split(args.dataset, args.data_root, args.split, factory(), args.out, args.n, args.batch_size,
                       progress=not args.no_progress, limit=args.limit, engine=args.engine, editor_factory=factory,
                       address=args.ray_address, concurrency=args.concurrency_ray, force=args.force)
    print(f"{stats.triplets} triplets x {args.n}: {stats.cached} pseudo-targets already made, {stats.made} made; "
          f"manifest: {Path(args.out) / 'manifest.jsonl'}")


def cmd_align_intent(args) -> None:
    from cirlab.backbones.base import resolve_source
    from cirlab.training.intent_align import align_intent

    out = align_intent(args.data_root, resolve_source(args.backbone), args.pseudo_targets, args.out,
                       _train_config(args), unfreeze=args.unfreeze, dataset=args.dataset, split=args.split,
                       resume=args.resume)
    print(f"saved the intent-aligned CLIP to {out}")


def _add_benchmark_parsers(sub) -> None:
    """score, submit, check-submission, data check and caption."""
    p = sub.add_parser("score", help="score a predictions file from annotation files alone")
    p.add_argument("--dataset", choices=("cirr", "circo", "fashioniq", "shoes", "synth", "synth-circo"),
                   required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--predictions", required=True)
    p.add_argument("--subset-predictions", help="CIRR recall_subset file (top 3 of the img_set)")
    p.add_argument("--join", choices=JOINS, default="and")
    p.add_argument("--json", action="store_true", help="end with one JSON object of the metrics")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("submit", help="write and check the test-server files of a checkpoint")
    p.add_argument("--dataset", choices=("cirr", "circo"), required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", help="default: test1 for CIRR, test for CIRCO")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("check-submission", help="check test-server files offline before upload")
    p.add_argument("--dataset", choices=("cirr", "circo"), required=True)
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("files", nargs="+")
    p.set_defaults(func=cmd_check_submission)

    p = sub.add_parser("data", help="inspect a benchmark's data root")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="report annotation files and images present and missing")
    p.add_argument("--dataset", choices=("cirr", "circo", "fashioniq", "shoes", "synth"), required=True)
    p.add_argument("--data-root", required=True)
    p.set_defaults(func=cmd_data_check)
    _add_caption_parser(sub)


def _add_caption_parser(sub) -> None:
    p = sub.add_parser("caption", help="multi-level chain-of-thought captions of a split's images, cached")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=("synth", "synth-circo", "cirr", "circo", "fashioniq", "shoes"),
                   default="synth")
    p.add_argument("--split", required=True)
    p.add_argument("--category", help="FashionIQ category (dress, shirt, toptee); default: all three")
    p.add_argument("--backend", choices=("oracle", "hf", "openai"), default="oracle",
                   help="oracle: the synthetic world's captioner; hf: a transformers image-text-to-text model; "
                        "openai: an OpenAI-compatible chat endpoint")
    p.add_argument("--model", help="hf: Hugging Face id or folder; openai: the served model's name")
    p.add_argument("--device", default="cpu", help="hf: torch device")
    p.add_argument("--max-new-tokens", type=int, default=256, help="hf and openai: answer length cap")
    p.add_argument("--base-url", help="openai: e.g. http://127.0.0.1:8000/v1 (default: $CIRLAB_OPENAI_BASE_URL, "
                                      "then $OPENAI_BASE_URL)")
    p.add_argument("--api-key", help="openai: default $CIRLAB_OPENAI_API_KEY, then $OPENAI_API_KEY")
    p.add_argument("--timeout", type=float, default=120.0, help="openai: seconds per request")
    p.add_argument("--retries", type=int, default=4, help="openai: retries per request, with exponential back-off")
    p.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight at once")
    p.add_argument("--out", required=True, help="the JSONL caption cache (appended; a rerun resumes)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--oracle-latency", type=float, default=0.0, help="seconds the oracle waits per batch")
    p.add_argument("--limit", type=int, help="caption only the first N gallery images (in name order)")
    p.add_argument("--no-progress", action="store_true")
    add_engine_options(p)
    p.set_defaults(func=cmd_caption)


def _add_edit_parser(sub) -> None:
    p = sub.add_parser("edit", help="pseudo-target images of a split's triplets from an image editor (TMCIR)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=("synth", "cirr", "fashioniq", "shoes"), default="synth")
    p.add_argument("--split", default="train")
    p.add_argument("--backend", choices=("oracle", "diffusers"), default="oracle",
                   help="oracle: the synthetic world renders the edited scene; diffusers: an InstructPix2Pix "
                        "pipeline")
    p.add_argument("--model", help="diffusers: Hugging Face id or folder (default timbrooks/instruct-pix2pix)")
    p.add_argument("--steps", type=int, default=20, help="diffusers: denoising steps")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="diffusers: text guidance")
    p.add_argument("--image-guidance-scale", type=float, default=1.5, help="diffusers: image guidance")
    p.add_argument("--device", default="cpu", help="diffusers: torch device")
    p.add_argument("--n", type=int, default=1, help="pseudo-targets per triplet")
    p.add_argument("--imperfection", type=float, default=0.0,
                   help="oracle: probability that each attribute the text does not mention is changed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="only the first N triplets")
    p.add_argument("--out", required=True, help="folder for images/ and manifest.jsonl (a rerun resumes)")
    p.add_argument("--force", action="store_true", help="add to a manifest made with other editor settings")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--oracle-latency", type=float, default=0.0, help="seconds the oracle waits per batch")
    p.add_argument("--no-progress", action="store_true")
    add_engine_options(p)
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("align-intent", help="TMCIR stage 1: fine-tune CLIP on (modification text, pseudo-target)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--dataset", choices=("synth",), default="synth")
    p.add_argument("--split", default="train")
    p.add_argument("--backbone", required=True, help="a CLIP folder or Hugging Face id")
    p.add_argument("--pseudo-targets", required=True, help="a folder written by `cirlab edit`")
    p.add_argument("--unfreeze", default="all", help="all, or how many last layers of each encoder train")
    p.add_argument("--out", required=True)
    _add_train_options(p, epochs=1, batch_size=64, lr=1e-5)
    p.set_defaults(func=cmd_align_intent)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="train a registered method")
    p.add_argument("--method", required=True)
    p.add_argument("--dataset", choices=DATASETS, default="synth")
    p.add_argument("--join", choices=JOINS, default="and", help="FashionIQ caption join (see README)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--backbone", required=True, help="Hugging Face id or folder of the backbone")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="method config as JSON text or a JSON file")
    p.add_argument("--group-by-reference", action="store_true",
                   help="batch together the triplets that share a reference image (harder in-batch negatives)")
    p.add_argument("--captions", help="caption cache (JSONL from `cirlab caption`) of the train images, for methods "
                                      "that read target captions (csmcir); the synthetic world brings its own")
    p.add_argument("--triplets", type=int, default=500,
                   help="zero-shot methods (mapcompose): synthetic triplets for stage II (0: stage I only)")
    p.add_argument("--stage2-epochs", type=int, default=None,
                   help="zero-shot methods: stage II epochs (default: --epochs)")
    p.add_argument("--nproc", type=int, default=1,
                   help="data-parallel processes on this machine (gloo on CPU, nccl on CUDA); --batch-size is per "
                        "process; under torchrun leave it at 1")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="keep a frozen image stage's outputs (csmcir's ViT) on disk here, shared by later runs with "
                        "the same backbone and preprocessing")
    _add_train_options(p, epochs=10, batch_size=64, lr=1e-3)
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cirlab", description="Composed image retrieval: train, evaluate, search.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic CIR world (CIRR and CIRCO layouts)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", choices=("small", "default"), default="default")
    p.add_argument("--chains", type=int, default=0, help="also write N multi-turn chains (2 and 3 edits, each "
                                                         "turn's target in the gallery): `cirlab eval --split chains`")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that render the images (default: one per core); the files are the same")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pretrain", help="pretrain a tiny backbone contrastively on synthetic (scene, caption) pairs")
    p.add_argument("--backbone", choices=("clip", "blip2"), required=True)
    p.add_argument("--data", required=True, help="a synthetic world written by `cirlab synth`")
    p.add_argument("--out", required=True)
    p.add_argument("--backbone-config", help='JSON overrides of the tiny config, e.g. {"width": 96, "layers": 2}')
    p.add_argument("--init-from", metavar="CLIP_DIR",
                   help="blip2 only: build on this CLIP's ViT (frozen) and train the Q-Former side alone")
    _add_train_options(p, epochs=2, batch_size=128, lr=1e-3)
    p.set_defaults(func=cmd_pretrain)

    _add_train_parser(sub)

    p = sub.add_parser("eval", help="evaluate a checkpoint on a split")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", choices=DATASETS, default="synth")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--join", choices=JOINS, default="and", help="FashionIQ caption join (see README)")
    p.add_argument("--reference", choices=("default", "keep", "remove"), default="default",
                   help="keep or remove the reference from its own ranking (default: the benchmark's protocol)")
    p.add_argument("--json", help="where to write the metrics (default: inside the checkpoint folder)")
    p.add_argument("--captions", help="caption cache (JSONL from `cirlab caption`) for methods that read captions "
                                      "(csmcir's targets, caption_compose's references); the synthetic world "
                                      "brings its own")
    p.add_argument("--device", default="cpu")
    p.add_argument("--limit", type=int, help="score only the first N queries of each split (the whole gallery)")
    p.add_argument("--rerank", metavar="CHECKPOINT", help="a second model that rescores each query's top K")
    p.add_argument("--rerank-k", type=int, default=50, help="how many first-stage results --rerank rescores")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_eval)

    _add_benchmark_parsers(sub)

    add_research_parsers(sub)
    _add_edit_parser(sub)
    add_engine_parsers(sub)

    return parser


# commands whose steps allocate and free large tensors over and over (cirlab/allocator.py)
TRAINING_COMMANDS = {"demo", "train", "pretrain", "align-intent", "ablate", "bench"}


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        if args.command in TRAINING_COMMANDS:
            from cirlab import allocator

            if argv is None:  # the program itself, not a caller's process: start again under tcmalloc
                allocator.reexec()
            allocator.prepare()
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading bars would bury our own progress and errors
        status = args.func(args)
    except CirlabError as e:
        print(f"cirlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cirlab: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
