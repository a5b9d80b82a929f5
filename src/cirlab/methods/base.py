"""The `CIRModel` interface every method and baseline implements, its registry, and checkpoint save/load.

A checkpoint is a folder: `cirlab.json` (method, config, backbone kind and source, cirlab version),
`model.safetensors` (the method's own parameters) and, when the method fine-tunes its backbone, the backbone's own
files under `backbone/` (written with `save_pretrained`, loaded back with `from_pretrained`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.atomic import replace_folder, resolve_folder
from cirlab.errors import Choice, CirlabError, parse_choices
from cirlab.types import Batch, LossOutput

CHECKPOINT_FILE = "cirlab.json"
WEIGHTS_FILE = "model.safetensors"
REGISTRY: dict = {}  # name -> CIRModel subclass


def register(cls):
    """Class decorator: make a method available by its `name`."""
    REGISTRY[cls.name] = cls
    return cls


def method_class(name: str):
    import cirlab.methods  # noqa: F401  (registers the built-in methods)

    if name not in REGISTRY:
        raise CirlabError(f"unknown method {name!r}; registered methods: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


class TrainingKind(str, enum.Enum):
    """How a method learns, declared by its class; `training.train.train` dispatches on it."""
    NONE = "none"  # nothing to learn: its checkpoint only records the backbone (zero-shot baselines)
    TRIPLETS = "triplets"  # trained on a benchmark's (reference, text, target) triplets
    ZERO_SHOT = "zero-shot"  # trained on image-caption pairs (and its own synthetic triplets), never on triplets


class Finetune(Choice):
    NONE = "none"
    TEXT = "text"
    IMAGE = "image"
    BOTH = "both"


@dataclasses.dataclass
class MethodConfig:
    """Fields every method config has. `finetune` says which backbone towers train: none, text, image or both.
    Fields typed with a `Choice` enum are checked and converted when the config is made."""
    finetune: Finetune = Finetune.NONE

    def __post_init__(self):
        parse_choices(self)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise CirlabError(f"unknown config field(s) for {cls.__name__}: {', '.join(sorted(unknown))}")
        return cls(**d)


class CIRModel(nn.Module):
    """Composed image retrieval model: composed queries and targets in one space, the method's own scoring."""
    name = ""
    config_class = MethodConfig
    backbone_kind = "clip"
    training = TrainingKind.NONE

    def __init__(self, config, backbone):
        super().__init__()
        self.config, self.backbone = config, backbone
        self._set_finetune(config.finetune)

    # ----------------------------------------------------------------- the interface
    @property
    def target_captions(self) -> str | None:
        """The caption level `encode_target` reads ("final_caption" or an MCoT level, see Split.caption_texts), or
        None when targets are images alone."""
        return None

    @property
    def query_captions(self) -> str | None:
        """The caption level `encode_query` reads of each query's reference image, passed to it as `references`
        (a list of types.Reference), or None when a query is an image and a text alone."""
        return None

    @property
    def caption_level(self) -> str | None:
        """The one caption level an index stores per item: what targets read, else what queries read."""
        return self.target_captions or self.query_captions

    def notes(self) -> dict:
        """What a run of the method did beyond its metrics, for the result file (caption_compose: its composer's
        requests, cache hits and failures); the default has none."""
        return {}

    def on_load(self, folder: Path) -> None:
        """Called by `load_model` with the checkpoint folder (caption_compose keeps its answer cache there under
        cache/); the default does nothing."""

    @property
    def preprocess(self):
        """The backbone's image preprocessing: a callable (PIL images -> pixels on the CPU) with a `key()` that
        names it in cache keys."""
        return self.backbone.preprocess

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def prepare(self, images) -> torch.Tensor:
        """Pixels ready for `encode_query` and `encode_target`: PIL images preprocessed, on the model's device
        (preprocessed pixels are moved there)."""
        return self.pixels(images)

    def encode_query(self, images, texts) -> torch.Tensor:
        """Composed query features, L2-normalised: (B, D). A method with `query_captions` takes a third argument,
        `references`: one types.Reference (the image's id and its description) per query."""
        raise NotImplementedError

    def encode_target(self, images, captions=None) -> torch.Tensor:
        """Target features, L2-normalised: (N, D) or (N, K, D). A method whose targets read captions
        (`target_captions`) refuses to run without them."""
        if self.target_captions is not None and captions is None:
            raise CirlabError(f"{self.name} encodes targets from images and their {self.target_captions!r} captions: "
                              "pass captions= (cirlab caption writes them), or use a config whose targets read none")
        return self._encode_target(images, captions)

    def _encode_target(self, images, captions) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(B, D) x (N, D) -> (B, N); multi-token targets (N, K, D) take the max over K."""
        if targets.dim() == 3:
            return torch.einsum("bd,nkd->bnk", queries, targets).amax(-1)
        return queries @ targets.t()

    def loss(self, batch: Batch) -> LossOutput:
        raise CirlabError(f"method {self.name!r} has nothing to train")

    def query_context(self, dataset: str, split: str):
        """A context manager under which `encode_query` serves queries of `dataset`'s split `split` (zero-shot
        methods choose their prompt template by it); the default changes nothing."""
        return contextlib.nullcontext()

    def set_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        """Called by the trainer before the first step with the schedule it will run; the default ignores it
        (csmcir ties its memory bank's warm-up to it)."""

    def frozen_image_stage(self):
        """A function pixels -> features for a first image stage that does not train, else None.

        Training then feeds the method that stage's cached outputs in place of pixels (FrozenFeatureStore), so
        `encode_query` and `encode_target` of a method that returns one accept either.
        """
        return None

    # ----------------------------------------------------------------- helpers
    def _eval_stage(self, module: nn.Module, fn):
        """A `frozen_image_stage` function: pixels -> fn(pixels on the backbone's device), run with `module` in
        eval mode and its mode restored afterwards."""
        def run(pixels: torch.Tensor) -> torch.Tensor:
            was = module.training
            module.eval()
            try:
                return fn(pixels.to(self.backbone.device))
            finally:
                module.train(was)
        return run

    def _cached_or(self, images, fn) -> torch.Tensor:
        """Outputs of a frozen image stage: `images` itself when it already holds them (a 3-D tensor from the
        feature cache), else fn(pixels of `images`)."""
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            return images.to(self.backbone.device)
        return fn(self.pixels(images))

    def pixels(self, images) -> torch.Tensor:
        """Accept preprocessed pixels (B, 3, S, S) or a list of PIL images."""
        if isinstance(images, torch.Tensor):
            return images.to(self.backbone.device)
        return self.backbone.preprocess(images).to(self.backbone.device)

    def _set_finetune(self, mode: str) -> None:
        Finetune.of(mode, "finetune")
        self.backbone.requires_grad_(False)  # the backbone's own temperature stays frozen as well
        if mode in ("text", "both"):
            self._tower(text=True).requires_grad_(True)
        if mode in ("image", "both"):
            self._tower(text=False).requires_grad_(True)

    def _tower(self, text: bool) -> nn.Module:
        m = self.backbone.model
        if self.backbone.kind == "clip":
            return nn.ModuleList([m.text_model, m.text_projection] if text else [m.vision_model, m.visual_projection])
        return nn.ModuleList([m.embeddings, m.qformer, m.text_projection] if text else [m.vision_model])

    def param_groups(self, lr: float, backbone_lr: float, weight_decay: float) -> list:
        """Optimiser groups: the method's own parameters and, at its own rate, the fine-tuned backbone."""
        own = [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]
        bb = [p for p in self.backbone.parameters() if p.requires_grad]
        groups = [{"params": own, "lr": lr, "weight_decay": weight_decay}]
        if bb:
            groups.append({"params": bb, "lr": backbone_lr, "weight_decay": weight_decay})
        return [g for g in groups if g["params"]]

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1)

    # ----------------------------------------------------------------- persistence
    def save(self, folder) -> None:
        """Write the checkpoint folder: files go to a temporary folder first, which then takes the old one's place
        in one step (atomic.replace_folder), so a reader sees the old checkpoint or the new one, whole."""
        from safetensors.torch import save_file

        import cirlab

        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        own = {n: p.detach().cpu().contiguous() for n, p in self.state_dict().items()
               if not n.startswith("backbone.")}
        save_file(own, str(tmp / WEIGHTS_FILE))
        finetuned = self.config.finetune != "none"
        source = "backbone" if finetuned else _portable_source(self.backbone.source)
        if finetuned:
            self.backbone.save_pretrained(tmp / "backbone")
        meta = {"method": self.name, "config": self.config.to_json(), "cirlab_version": cirlab.__version__,
                "backbone": {"kind": self.backbone.kind, "source": source, "finetuned": finetuned}}
        (tmp / CHECKPOINT_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        replace_folder(tmp, folder)


def _portable_source(source: str) -> str:
    p = Path(source)
    return str(p.resolve()) if p.exists() else source


def build_model(name: str, backbone, config: dict | None = None) -> CIRModel:
    cls = method_class(name)
    return cls(cls.config_class.from_json(config or {}), backbone)


def load_model(path, device="cpu") -> CIRModel:
    """Rebuild a model from a checkpoint folder written by `CIRModel.save`."""
    from safetensors.torch import load_file

    from cirlab.backbones import load_backbone

    folder = resolve_folder(path)  # a save between its two renames (no atomic exchange): the previous version
    meta_path = folder / CHECKPOINT_FILE
    if not meta_path.exists():
        raise CirlabError(f"not a cirlab checkpoint (no {CHECKPOINT_FILE}): {folder}")
    try:
        meta = json.loads(meta_path.read_text())
        bb = meta["backbone"]
        source = folder / bb["source"] if bb.get("finetuned") else bb["source"]
        method, kind, config = meta["method"], bb["kind"], meta["config"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise CirlabError(f"malformed checkpoint file {meta_path}: {type(e).__name__} {e}") from None
    try:
        backbone = load_backbone(kind, source)
    except CirlabError:
        raise
    except Exception as e:  # transformers raises OSError, ValueError, JSON and safetensors errors for broken files
        raise CirlabError(f"the {kind} backbone of checkpoint {folder} cannot be loaded from {source}: "
                          f"{_first_line(e)}") from None
    model = build_model(method, backbone, config)
    try:
        own = load_file(str(folder / WEIGHTS_FILE))
    except Exception as e:  # missing, empty or truncated
        raise CirlabError(f"{folder / WEIGHTS_FILE} cannot be read ({_first_line(e)}): the checkpoint is incomplete "
                          "or damaged; save or train it again") from None
    missing, unexpected = model.load_state_dict(own, strict=False)
    missing = [m for m in missing if not m.startswith("backbone.")]
    if missing or unexpected:
        raise CirlabError(f"checkpoint {folder} does not match method {meta['method']!r}: "
                          f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.on_load(folder)
    return model.to(device).eval()


def _first_line(e: Exception, limit: int = 200) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:limit] if text else ''}"


def _file_stats(folder: Path, only_checkpoint_files: bool = False) -> list:
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if only_checkpoint_files and rel[0] not in (CHECKPOINT_FILE, WEIGHTS_FILE, "backbone"):
            continue  # results written beside the checkpoint (eval-*.json) do not change what it is
        if p.is_file() and "cache" not in rel:
            st = p.stat()
            out.append(f"{p.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}")
    return out


def checkpoint_identity(folder) -> str:
    """The identity of a checkpoint folder, for cache keys (gallery features, index manifests): it changes
    whenever a file of the checkpoint (cirlab.json, model.safetensors, backbone/) changes (name, size, modification
    time), or a file of the local backbone folder it points to (zero-shot checkpoints record their backbone instead
    of copying it). Files written beside them (eval results, cache/) do not count."""
    folder = Path(folder)
    parts = _file_stats(folder, only_checkpoint_files=True)
    meta = folder / "cirlab.json"
    if meta.exists():
        source = Path(json.loads(meta.read_text()).get("backbone", {}).get("source", ""))
        if source.is_absolute() and source.is_dir():
            parts += [f"backbone/{x}" for x in _file_stats(source)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]
