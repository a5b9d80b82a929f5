"""`cirlab init`, `cirlab index build|add|remove|info`, `cirlab search` and `cirlab serve`: the retrieval engine's
commands, the way to search your own photos."""
from __future__ import annotations

import json
import os
from pathlib import Path

from cirlab.cli.args import json_arg
from cirlab.errors import CirlabError


def _captioner_factory(args):
    """A picklable function that builds the --captioner (for Ray actors), or None."""
    if not getattr(args, "captioner", None):
        return None
    from functools import partial

    from cirlab.captioning.backends import make_backend

    return partial(make_backend, args.captioner, "", None, model=args.caption_model, base_url=args.caption_base_url)


def _captioner(args):
    factory = _captioner_factory(args)
    return factory() if factory else None


FAISS_OPTIONS = ("faiss", "nlist", "nprobe", "hnsw_m", "ef_search", "pq_m", "rescore", "coarse")


def _backend_params(args) -> dict:
    given = [name for name in FAISS_OPTIONS if getattr(args, name) is not None]
    if args.backend != "faiss" and given:
        raise CirlabError(f"--{given[0].replace('_', '-')} needs --backend faiss")
    if args.backend == "milvus":
        return {"uri": args.milvus_uri} if args.milvus_uri else {}
    if args.milvus_uri:
        raise CirlabError("--milvus-uri needs --backend milvus")
    if args.backend != "faiss":
        return {"dtype": args.dtype} if args.dtype else {}
    if args.dtype:
        raise CirlabError("--dtype goes with --backend exact (FAISS's quantised kinds: --faiss ivf_sq8 or ivf_pq)")
    return {"kind": args.faiss or "flat"} | {name: getattr(args, name) for name in given if name != "faiss"}


def _method_config(args) -> dict:
    config = json_arg(args.config, "--config")
    for flag in ("composer", "composer_model", "composer_base_url"):
        if getattr(args, flag, None):
            config[flag] = getattr(args, flag)
    return config


def init_checkpoint(method: str, backbone: str, out, config: dict) -> Path:
    """A checkpoint of a method that needs no training, from a CLIP by Hugging Face id or folder."""
    from cirlab.backbones.base import resolve_source
    from cirlab.methods import REGISTRY, TrainingKind, method_class
    from cirlab.training.train import save_zero_shot

    cls = method_class(method)
    if cls.training is not TrainingKind.NONE:
        free = sorted(n for n, c in REGISTRY.items() if c.training is TrainingKind.NONE)
        raise CirlabError(f"method {method} learns ({cls.training.value}): `cirlab train` writes its checkpoint; "
                          f"the methods that need no training are {', '.join(free)}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "cirlab.json").exists():
        raise CirlabError(f"{out} exists and is not a cirlab checkpoint; choose another --out")
    return save_zero_shot(method, resolve_source(backbone), out, config)


def cmd_init(args) -> None:
    out = init_checkpoint(args.method, args.backbone, args.out, _method_config(args))
    print(f"wrote a {args.method} checkpoint on {args.backbone} (nothing trained): {out}")


def cmd_index_build(args) -> None:
    from cirlab.index import check_settings
    from cirlab.serving.engine import build_index

    if (args.checkpoint is None) == (args.method is None):
        raise CirlabError("give --checkpoint, or --method with --backbone (a method that needs no training)")
    params = _backend_params(args)
    check_settings(args.backend, params)  # before --method writes its checkpoint
    checkpoint = args.checkpoint
    if args.method:
        if not args.backbone:
            raise CirlabError("--method needs --backbone (a CLIP's Hugging Face id or folder)")
        checkpoint = init_checkpoint(args.method, args.backbone, Path(args.out) / "checkpoint", _method_config(args))
    elif args.backbone or args.config:
        raise CirlabError("--backbone and --config go with --method, not --checkpoint")
    index = build_index(checkpoint, args.images, args.out, args.backend, params, args.captions,
                        _captioner(args), args.batch_size, progress=not args.no_progress, engine=args.engine,
                        address=args.ray_address, concurrency=args.concurrency_ray, limit=args.limit,
                        captioner_factory=_captioner_factory(args), metadata=args.metadata)
    m = index.manifest
    print(f"indexed {len(index)} images with {m['method']} ({m['backend']}, dim {m['dim']}): {args.out}")
    if args.target_recall is not None:
        _print_tuned(index.tune(args.target_recall))


def _print_tuned(tuned: dict) -> None:
    knob = "nprobe" if "nprobe" in tuned else "ef_search"
    recall = next(v for k, v in tuned.items() if k.startswith("recall@"))
    verdict = "reached" if tuned["reached"] else "NOT reached (the largest value tried)"
    print(f"tuned {knob} = {tuned[knob]}: recall@10 {recall:.4f} on {tuned['queries']} queries, target "
          f"{tuned['target_recall']} {verdict}")


def cmd_index_tune(args) -> None:
    import numpy as np

    from cirlab.index import ImageIndex

    queries = None
    if args.queries:
        try:
            queries = np.load(args.queries)
        except (OSError, ValueError) as e:
            raise CirlabError(f"cannot read query vectors from {args.queries}: {e}") from None
    _print_tuned(ImageIndex(args.index).tune(args.target_recall, queries, args.n_queries))


def cmd_index_add(args) -> None:
    from cirlab.serving.engine import IMAGE_EXTENSIONS, Engine, scan_images

    engine = Engine(args.index)
    items = []
    for p in map(Path, args.paths):
        if p.is_dir():
            items += scan_images(p)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            items.append((p.stem, str(p.resolve())))
        else:
            raise CirlabError(f"not an image file or folder: {p}")
    metas = None
    if args.metadata:
        from cirlab.serving.engine import read_metadata

        metas = read_metadata(args.metadata, items)
    engine.add(items, args.captions, _captioner(args), replace=args.replace, progress=not args.no_progress,
               metas=metas)
    print(f"added {len(items)} images; the index holds {len(engine.index)}")


def cmd_index_remove(args) -> None:
    from cirlab.index import ImageIndex

    index = ImageIndex(args.index)
    try:
        index.remove(args.ids)
    except KeyError as e:
        raise CirlabError(f"unknown id {e.args[0]!r}; nothing removed") from None
    print(f"removed {len(args.ids)}; the index holds {len(index)}")


def cmd_index_info(args) -> None:
    from cirlab.index import ImageIndex

    print(json.dumps(ImageIndex(args.index).manifest, indent=1))


def _read_queries(path) -> list:
    """(line number, image or image id, text, k, filter or None) of each line of a --queries JSONL file, checked
    with the line named."""
    from cirlab.data.images import open_image

    from cirlab.jsonl import json_lines

    out = []
    for n, q in json_lines(path, "queries"):
        if ("image" in q) == ("image_id" in q) or not str(q.get("text", "")).strip():
            raise CirlabError(f"{path}: line {n} needs exactly one of \"image\" and \"image_id\", and a \"text\"")
        k = q.get("k", 10)
        if not isinstance(k, int) or k < 1:
            raise CirlabError(f"{path}: line {n}: k must be a positive integer, got {k!r}")
        spec = q.get("filter")
        if spec is not None:
            from cirlab.index.filters import check_filter

            try:
                check_filter(spec)
            except CirlabError as e:
                raise CirlabError(f"{path}: line {n}: {e}") from None
        out.append((n, open_image(q["image"]) if "image" in q else q["image_id"], q["text"], k, spec))
    return out


def _hits_json(engine, hits) -> list:
    return [{"id": h.id, "score": round(h.score, 6), "path": engine.index.item(h.id)["path"]} for h in hits]


def _session_turn(args) -> None:
    """`cirlab search --session FILE`: one more turn of the session kept in FILE (created when missing)."""
    from cirlab.atomic import write_atomic
    from cirlab.data.images import open_image
    from cirlab.serving.engine import Engine
    from cirlab.serving.session import Session

    engine = Engine(args.index, captioner=_captioner(args), rerank=args.rerank, rerank_k=args.rerank_k)
    path = Path(args.session)
    try:
        doc = json.loads(path.read_text()) if path.exists() else {"turns": []}
    except json.JSONDecodeError as e:
        raise CirlabError(f"{path}: not a session file ({e})") from None
    session = Session.from_json(engine, doc)
    if args.choose:
        session.choose(args.choose)
    image = open_image(args.image) if args.image else args.image_id
    spec = json_arg(args.filter, "--filter") or None
    turn = session.turn(args.text, image, args.k, spec)
    write_atomic(path, lambda f: f.write((json.dumps(session.to_json(), indent=1) + "\n").encode()))
    if args.json:
        print(json.dumps({"turn": len(session.turns), "reference": turn.reference, "hits": turn.hits}))
        return
    print(f"turn {len(session.turns)}, from {turn.reference}: {turn.text}")
    for rank, h in enumerate(turn.hits, 1):
        print(f"{rank:3d}  {h['score']:.4f}  {h['id']}")


def cmd_search(args) -> None:
    from cirlab.data.images import open_image
    from cirlab.serving.engine import Engine

    if args.queries:
        if args.image or args.image_id or args.text:
            raise CirlabError("--queries replaces --image, --image-id and --text")
    elif args.session:
        if not (args.text or "").strip():
            raise CirlabError("--text is empty: say what to change")
    else:
        if (args.image is None) == (args.image_id is None):
            raise CirlabError("give exactly one of --image and --image-id (or --queries FILE)")
        if not (args.text or "").strip():
            raise CirlabError("--text is empty: say what to change")
    if args.k < 1:
        raise CirlabError(f"-k must be at least 1, got {args.k}")
    if args.session:
        return _session_turn(args)
    queries = _read_queries(args.queries) if args.queries else None
    engine = Engine(args.index, captioner=_captioner(args), rerank=args.rerank, rerank_k=args.rerank_k)
    if queries is not None:  # one model load for every query; one JSON line per query, in file order
        for n, query, text, k, spec in queries:
            hits = engine.search(query, text, k, filter=spec)
            print(json.dumps({"line": n, "hits": _hits_json(engine, hits)}), flush=True)
        return
    spec = json_arg(args.filter, "--filter") or None
    if spec is not None:
        from cirlab.index.filters import check_filter

        check_filter(spec)
    query = open_image(args.image) if args.image else args.image_id
    hits = engine.search(query, args.text, args.k, filter=spec, more=args.more or [], less=args.less or [])
    if args.json:
        print(json.dumps({"hits": _hits_json(engine, hits)}))
        return
    for rank, h in enumerate(hits, 1):
        print(f"{rank:3d}  {h.score:.4f}  {h.id}  {engine.index.item(h.id)['path']}")


def cmd_serve(args) -> None:
    try:
        import uvicorn
    except ImportError as e:
        raise CirlabError("serving needs fastapi, uvicorn and python-multipart: pip install 'cirlab[serve]'") from e
    from cirlab.serving.app import create_app
    from cirlab.serving.service import SearchService

    from cirlab.serving.engine import Engine

    captioner = _captioner(args)
    service = SearchService(args.index, api_key=os.environ.get("CIRLAB_API_KEY"),
                            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), captioner=captioner,
                            engine=Engine(args.index, captioner=captioner, rerank=args.rerank,
                                          rerank_k=args.rerank_k))
    writes = "writes enabled" if service.api_key else "read-only (set CIRLAB_API_KEY to enable writes)"
    print(f"serving {len(service.index)} images of {args.index} on http://{args.host}:{args.port} ({writes})",
          flush=True)
    from cirlab.serving.work import BoundedWork

    if args.workers < 1 or args.max_queue < 0 or args.request_timeout <= 0:
        raise CirlabError("--workers must be at least 1, --max-queue at least 0 and --request-timeout above 0")
    work = BoundedWork(args.workers, args.max_queue, args.request_timeout)
    app = create_app(service, tuple(args.cors_origin or ()), tuple(args.allowed_host or ()), work)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def add_engine_options(p) -> None:
    """--engine local|ray for the batch jobs (cirlab.batches)."""
    p.add_argument("--engine", choices=("local", "ray"), default="local",
                   help="local: this process; ray: a Ray Data actor pool (a local Ray, or --ray-address)")
    p.add_argument("--ray-address", help="the Ray cluster to join (ray://host:10001 or auto); default: a local Ray")
    p.add_argument("--ray-actors", dest="concurrency_ray", type=int, default=2,
                   help="ray: workers (actors) in the pool (default 2)")


def _add_captioner_options(p, cache: bool = True) -> None:
    if cache:
        p.add_argument("--captions", help="caption cache (JSONL from `cirlab caption`) for methods whose targets "
                                          "read captions (csmcir)")
    p.add_argument("--captioner", choices=("hf", "openai"), help="caption images the cache lacks with this backend")
    p.add_argument("--caption-model", help="the captioner's model (Hugging Face id or folder; or the served name)")
    p.add_argument("--caption-base-url", help="the OpenAI-compatible server of --captioner openai")


def _add_backend_options(b) -> None:
    """index build's choice of backend and its parameters (a FAISS one the kind does not use is refused)."""
    from cirlab.index import BACKENDS, COARSE, FAISS_KINDS

    b.add_argument("--backend", choices=BACKENDS, default="exact")
    b.add_argument("--faiss", choices=FAISS_KINDS, help="the FAISS index type (default flat)")
    b.add_argument("--nlist", type=int, help="ivf: number of cells (default about 4 sqrt(N))")
    b.add_argument("--nprobe", type=int, help="ivf: cells searched per query (default 16)")
    b.add_argument("--hnsw-m", type=int, help="hnsw: links per node (default 32)")
    b.add_argument("--ef-search", type=int, help="hnsw: search breadth (default 64)")
    b.add_argument("--coarse", choices=COARSE, help="ivf kinds: find the probed cells by scoring every "
                   "centroid (flat, the default) or through an HNSW graph over them (cheaper at many cells)")
    b.add_argument("--pq-m", type=int, help="ivf_pq: bytes of code per vector (default 32; must divide the dimension)")
    b.add_argument("--rescore", type=int, help="ivf_sq8 and ivf_pq: candidates per result rescored exactly from the "
                                               "float vectors on disk (default 4; 0: quantised scores)")
    b.add_argument("--dtype", choices=("float32", "float16"), help="exact: the vectors' type in memory")
    b.add_argument("--milvus-uri", help="milvus: a Milvus server URL, or a milvus-lite file (default: milvus.db in "
                                        "the index folder)")
    b.add_argument("--target-recall", type=float, help="faiss ivf and hnsw: calibrate nprobe or ef_search so that "
                                                         "recall@10 against exact search reaches this (e.g. 0.99)")


def _add_index_parsers(sub) -> None:
    p = sub.add_parser("index", help="build and edit a persistent index of your own images")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed every image under a folder (recursively) into a new index")
    b.add_argument("--checkpoint", help="a trained or initialised checkpoint (or give --method and --backbone)")
    b.add_argument("--method", help="a method that needs no training (image_only, text_only, sum, "
                                    "caption_compose): its checkpoint is written to OUT/checkpoint")
    b.add_argument("--backbone", help="with --method: a CLIP's Hugging Face id or folder")
    b.add_argument("--config", help="with --method: the method's config as JSON (inline or a file)")
    b.add_argument("--images", required=True)
    b.add_argument("--out", required=True)
    _add_backend_options(b)
    b.add_argument("--batch-size", type=int, default=64)
    b.add_argument("--limit", type=int, help="index only the first N images (by id: their paths in name order)")
    b.add_argument("--metadata", metavar="FILE", help='JSONL lines {"id" or "path": ..., KEY: VALUE, ...}: each '
                                                      "item's metadata, for search filters")
    add_engine_options(b)
    _add_captioner_options(b)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=cmd_index_build)

    a = isub.add_parser("add", help="embed and add image files or folders")
    a.add_argument("index")
    a.add_argument("paths", nargs="+")
    a.add_argument("--replace", action="store_true", help="overwrite items whose id exists")
    a.add_argument("--metadata", metavar="FILE", help="the items' metadata, as for index build")
    _add_captioner_options(a)
    a.add_argument("--no-progress", action="store_true")
    a.set_defaults(func=cmd_index_add)

    r = isub.add_parser("remove", help="remove items by id")
    r.add_argument("index")
    r.add_argument("ids", nargs="+")
    r.set_defaults(func=cmd_index_remove)

    t = isub.add_parser("tune", help="calibrate a FAISS ivf or hnsw index to a target recall@10")
    t.add_argument("index")
    t.add_argument("--target-recall", type=float, required=True)
    t.add_argument("--queries", help="query vectors (.npy, (B, D)); default: indexed vectors with noise")
    t.add_argument("--n-queries", type=int, default=200)
    t.set_defaults(func=cmd_index_tune)

    i = isub.add_parser("info", help="print the index manifest")
    i.add_argument("index")
    i.set_defaults(func=cmd_index_info)


def _add_init_parser(sub) -> None:
    p = sub.add_parser("init", help="write the checkpoint of a method that needs no training, from any CLIP")
    p.add_argument("--method", required=True, help="image_only, text_only, sum or caption_compose")
    p.add_argument("--backbone", required=True, help="a CLIP's Hugging Face id (openai/clip-vit-large-patch14) "
                                                     "or a local folder")
    p.add_argument("--out", required=True)
    p.add_argument("--config", help="the method's config as JSON (inline or a file)")
    p.add_argument("--composer", choices=("oracle", "hf", "openai"), help="caption_compose: the composer backend")
    p.add_argument("--composer-model", help="caption_compose: the composer's model (hf: id or folder; openai: the "
                                            "served name)")
    p.add_argument("--composer-base-url", help="caption_compose: the openai composer's endpoint")
    p.set_defaults(func=cmd_init)


def add_engine_parsers(sub) -> None:
    _add_init_parser(sub)
    _add_index_parsers(sub)

    s = sub.add_parser("search", help="search an index with a reference image and a modification text")
    s.add_argument("--index", required=True)
    s.add_argument("--image", help="a reference image file")
    s.add_argument("--image-id", help="an indexed image as the reference")
    s.add_argument("--text")
    s.add_argument("--queries", metavar="FILE", help="many queries in one run (the model loads once): JSONL lines "
                                                      '{"image_id" or "image", "text", "k"}; prints one JSON line each')
    s.add_argument("-k", type=int, default=10)
    s.add_argument("--session", metavar="FILE", help="a multi-turn session kept in FILE (created when missing): "
                                                     "without --image or --image-id, this turn refines the last "
                                                     "turn's --choose'n or top result")
    s.add_argument("--choose", metavar="ID", help="with --session: the last turn's result to refine")
    s.add_argument("--more", action="append", metavar="ID", help="feedback: an indexed image like the ones wanted "
                                                                 "(repeatable)")
    s.add_argument("--less", action="append", metavar="ID", help="feedback: an indexed image unlike them (repeatable)")
    s.add_argument("--filter", help='only items whose metadata passes, e.g. {"colour": "red", "year": {"gte": 2020}} '
                                     "(JSON, inline or a file; see docs/engine-and-service.md)")
    s.add_argument("--json", action="store_true")
    s.add_argument("--rerank", metavar="CHECKPOINT", help="a second model that rescores the first --rerank-k "
                                                          "results (it encodes their images now)")
    s.add_argument("--rerank-k", type=int, default=50)
    _add_captioner_options(s, cache=False)  # describes an --image for a method whose queries read descriptions
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("serve", help="the HTTP API and web page over an index")
    v.add_argument("--index", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--max-upload-mb", type=float, default=10.0)
    v.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let pages of this origin call the API (repeatable; default: none, CORS off)")
    v.add_argument("--allowed-host", action="append", metavar="HOST",
                   help="answer only requests whose Host header is this (repeatable; e.g. 127.0.0.1 and localhost)")
    v.add_argument("--workers", type=int, default=2, help="threads that run searches, turns and additions")
    v.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for a worker; beyond it, 503 at once (default 16)")
    v.add_argument("--request-timeout", type=float, default=30.0,
                   help="seconds a search, turn or addition may take before it is answered 503 (default 30)")
    v.add_argument("--rerank", metavar="CHECKPOINT", help="a second model that rescores the first --rerank-k results")
    v.add_argument("--rerank-k", type=int, default=50)
    _add_captioner_options(v, cache=False)  # uploads to an index whose method reads target captions
    v.add_argument("--log-level", default="warning")
    v.set_defaults(func=cmd_serve)
