"""One training loop for every method and for backbone pretraining.

AdamW, linear warm-up then cosine decay, gradient accumulation, autocast where the device has it (bf16 on CUDA),
seeded determinism (each epoch's order and dropout come from seed and epoch, so `resume` continues to the same
result), a resumable state file and an exported checkpoint after each epoch, progress bars, and a JSONL metrics log
(TensorBoard as well when it is installed).
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from cirlab.errors import CirlabError
from cirlab.methods.base import CIRModel
from cirlab.training.distributed import Rank, average_gradients, barrier, current, mean_across_ranks

STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3  # the method's own parameters
    backbone_lr: float = 1e-4  # fine-tuned backbone towers
    weight_decay: float = 0.01
    warmup_steps: int = 50
    grad_accum: int = 1
    amp: str = "auto"  # auto (bf16 on CUDA, off on CPU), off, bf16, fp16
    seed: int = 0
    log_every: int = 20
    steps_per_epoch: int = 0  # 0: the whole data set each epoch; otherwise at most this many steps
    group_by_reference: bool = False  # batch whole groups of triplets that share a reference (see TripletSource)
    cache_frozen: bool = True  # feed cached outputs of a method's frozen image stage (see CIRModel.frozen_image_stage)
    device: str = "cpu"
    progress: bool = True
    force_resume: bool = False  # resume even when the schedule or the model's settings differ from the saved run's


# the settings a resumed run must share with the run it continues (the rest, such as progress and log_every, may
# change): another value would mix two schedules in one model
SCHEDULE_FIELDS = ("epochs", "batch_size", "lr", "backbone_lr", "weight_decay", "warmup_steps", "grad_accum", "amp",
                   "seed", "steps_per_epoch", "group_by_reference")


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def batch(self, indices: list): ...


@dataclass
class TrainResult:
    epochs_done: int
    steps: int
    losses: list  # mean loss per epoch
    seconds: float


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _autocast(cfg: TrainConfig, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    if mode == "off":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=torch.bfloat16 if mode == "bf16" else torch.float16)


def _atomic_save(obj, path: Path) -> None:
    from cirlab.atomic import write_atomic

    write_atomic(path, lambda f: torch.save(obj, f))


class _Logger:
    def __init__(self, out: Path, resume_step: int | None):
        """A fresh log, or (resuming from the state of step `resume_step`) the log cut back to that step: the
        records a killed run wrote after its last saved state are dropped, so none appears twice."""
        self.path = out / METRICS_FILE
        if resume_step is None and self.path.exists():
            self.path.unlink()
        elif resume_step is not None and self.path.exists():
            from cirlab.atomic import write_atomic

            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line + "\n")
                except json.JSONDecodeError:  # a line torn by the kill
                    continue
            write_atomic(self.path, lambda f: f.write("".join(kept).encode()))
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"))
        except Exception:  # tensorboard is optional
            self.tb = None

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch"):
                    self.tb.add_scalar(k, v, record.get("step", 0))


def _run_identity(module, cfg: TrainConfig, rank: Rank) -> dict:
    """What a resumed run must share with the saved one: the schedule, the process count and what is trained."""
    what = {"method": module.name, "config": module.config.to_json()} if isinstance(module, CIRModel) \
        else {"module": type(module).__name__}
    return {"schedule": {f: getattr(cfg, f) for f in SCHEDULE_FIELDS}, "processes": rank.world} | what


def _read_state(path: Path, device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except Exception as e:  # a torn or foreign file: torch raises several kinds
        raise CirlabError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]}); delete it "
                          "to start over without --resume") from None
    if not isinstance(state, dict) or not {"model", "optimizer", "scheduler", "epoch"} <= set(state):
        raise CirlabError(f"{path} is not a cirlab training state; delete it to start over without --resume")
    return state


def _resume(path: Path, module, opt, sched, run: dict, cfg: TrainConfig, device) -> tuple:
    """Load the saved state into the module, optimizer and schedule (after checking it is the same run);
    returns (epoch, step, losses) to continue from."""
    state = _read_state(path, device)
    _check_same_run(state, run, cfg, path)
    module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return state["epoch"], state["step"], state["losses"]


def _check_same_run(state: dict, run: dict, cfg: TrainConfig, path: Path) -> None:
    """Refuse (one line naming the first difference) to resume a run whose method, model settings, schedule or
    process count differ from the saved one's, unless `cfg.force_resume`."""
    saved = state.get("run")
    if saved is None or cfg.force_resume:  # a state written before runs were recorded
        return
    if saved.get("method") != run.get("method") or saved.get("module") != run.get("module"):
        raise CirlabError(f"{path} is a run of {saved.get('method') or saved.get('module')}, not of "
                          f"{run.get('method') or run.get('module')}: choose another --out, or drop --resume")
    for group in ("schedule", "config"):
        old, new = saved.get(group, {}), run.get(group, {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                where = "" if group == "schedule" else "the method's config field "
                raise CirlabError(f"--resume would change {where}{key} from {old.get(key)!r} to "
                                  f"{new.get(key)!r} ({path}); keep it, or pass --force to resume anyway")
    if saved.get("processes") != run["processes"]:
        raise CirlabError(f"--resume would change the process count from {saved.get('processes')} to "
                          f"{run['processes']} ({path}); keep it, or pass --force to resume anyway")


def _optimizer(module: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> tuple:
    """AdamW over the module's parameter groups (its own and the fine-tuned backbone's), warm-up + cosine."""
    if hasattr(module, "param_groups"):
        groups = module.param_groups(cfg.lr, cfg.backbone_lr, cfg.weight_decay)
    else:
        groups = [{"params": [p for p in module.parameters() if p.requires_grad], "lr": cfg.lr}]
    if not any(g["params"] for g in groups):
        raise CirlabError("nothing to train: every parameter is frozen")
    # the fused kernel updates all parameters in one pass: on 2 CPU cores it is ~15x faster than the default
    # for-each path, which mattered for the tiny backbones' 49,408-row word tables (0.09 s of a 0.5 s step)
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, total_steps))


def _accumulate(module, data: BatchSource, order: list, step_in_epoch: int, cfg: TrainConfig, device,
                rank: Rank) -> tuple:
    """Forward and backward over `grad_accum` micro-batches (this rank's slice of each global micro-batch), then
    gradients averaged across ranks; returns the step's mean loss (this rank's) and named parts."""
    loss, parts = 0.0, {}
    for a in range(cfg.grad_accum):
        lo = ((step_in_epoch * cfg.grad_accum + a) * rank.world + rank.rank) * cfg.batch_size
        batch = data.batch(order[lo:lo + cfg.batch_size]).to(device)
        batch.rank = rank
        with _autocast(cfg, device):
            out = module.loss(batch)
        (out.loss / cfg.grad_accum).backward()
        loss += out.loss.item() / cfg.grad_accum
        for k, v in out.parts.items():
            parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
    average_gradients(module)
    return loss, parts


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """The order of the `n` examples in `epoch`, drawn from seed and epoch; torch's global generator is seeded
    from them too (dropout and any sampling inside the model), so a resumed run or a replay repeats the epoch."""
    gen = torch.Generator().manual_seed(seed * 100003 + epoch)
    torch.manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def fit(module: torch.nn.Module, data: BatchSource, cfg: TrainConfig, out: Path, resume: bool = False,
        export: Callable[[Path], None] | None = None, desc: str = "train") -> TrainResult:
    """Train `module` (anything with `loss(batch) -> LossOutput`) on `data`; returns per-epoch mean losses.

    In a process group (training/distributed.py) `batch_size` is per rank, each rank trains on its slice of every
    global batch, and only rank 0 writes the log, the state and the export; the losses returned are the ranks'
    mean."""
    rank = current()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(f"cuda:{rank.rank}" if cfg.device == "cuda" and rank.world > 1 else cfg.device)
    module.to(device)
    steps_per_epoch = max(1, len(data) // (cfg.batch_size * cfg.grad_accum * rank.world))
    if cfg.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.steps_per_epoch)
    opt, sched = _optimizer(module, cfg, steps_per_epoch * cfg.epochs)
    if isinstance(module, CIRModel):
        module.set_schedule(steps_per_epoch, steps_per_epoch * cfg.epochs)
    start_epoch, step, losses = 0, 0, []
    state_path = out / STATE_FILE
    run = _run_identity(module, cfg, rank)
    resumed = resume and state_path.exists()
    if resumed:
        start_epoch, step, losses = _resume(state_path, module, opt, sched, run, cfg, device)
    logger = _Logger(out, step if resumed else None) if rank.main else None
    t0 = time.time()
    for epoch in range(start_epoch, cfg.epochs):
        module.train()
        order = epoch_order(len(data), cfg.seed, epoch)
        epoch_loss = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not cfg.progress or not rank.main, mininterval=1.0)
        for s in bar:
            opt.zero_grad(set_to_none=True)
            loss, parts = _accumulate(module, data, order, s, cfg, device, rank)
            opt.step()
            sched.step()
            step += 1
            epoch_loss += loss
            bar.set_postfix(loss=f"{loss:.3f}")
            if step % cfg.log_every == 0 and logger is not None:
                logger.log({"step": step, "epoch": epoch, "loss": loss, "lr": sched.get_last_lr()[0],
                            **{f"loss/{k}": v for k, v in parts.items()}})
        losses.append(mean_across_ranks(epoch_loss / steps_per_epoch))
        if rank.main:
            logger.log({"step": step, "epoch": epoch + 1, "epoch_loss": losses[-1], "seconds": time.time() - t0})
            if export is not None:
                module.eval()
                export(out)
            _atomic_save({"model": module.state_dict(), "optimizer": opt.state_dict(),
                          "scheduler": sched.state_dict(), "epoch": epoch + 1, "step": step, "losses": losses,
                          "config": dataclasses.asdict(cfg), "run": run}, state_path)
        barrier()  # no rank starts the next epoch (or returns) before the checkpoint is written
    module.eval()
    return TrainResult(cfg.epochs, step, losses, time.time() - t0)
