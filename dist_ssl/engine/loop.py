"""The training loop: the only place that calls backward, clips, scales and steps optimizers.

Runs the same under `dist-ssl train` (one process) and `accelerate launch` (N processes, DDP over
gloo on CPU or NCCL on GPUs). Batch sizes in the config are global: each rank takes its share, so
a run means the same thing on 1 or 8 processes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_ssl.config import Config, save_config, to_dict
from dist_ssl.data.shards import Manifest, load_manifest
from dist_ssl.data.streams import TrainStream, loader, mix
from dist_ssl.data.transforms import build_views
from dist_ssl.engine import checkpoint
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.engine.evaluate import evaluate
from dist_ssl.engine.logging import RunLogger
from dist_ssl.engine.optim import build_optimizer, build_scheduler
from dist_ssl.errors import UserError
from dist_ssl.methods import get_method
from dist_ssl.methods.base import Method, StepContext, TrainBatch
from dist_ssl.models import build_model


@dataclass
class RunData:
    labeled: Manifest
    unlabeled: Manifest | None
    test: Manifest

    @property
    def source(self) -> str:
        return self.labeled.data.get("source", "?")


def split_path(cfg: Config, name: str) -> Path:
    if not cfg.data.shards:
        raise UserError("data.shards is not set: point it at a folder written by `dist-ssl shards write`")
    path = Path(getattr(cfg.data, name))
    return path if path.is_absolute() else Path(cfg.data.shards) / path


def load_run_data(cfg: Config, method: type[Method]) -> RunData:
    """Read and cross-check the manifests a run needs, before any process group exists."""
    root = Path(cfg.data.shards) if cfg.data.shards else None
    if root is not None and not root.is_dir():
        raise UserError(f"shard folder not found: {root}")
    labeled = load_manifest(split_path(cfg, "labeled"))
    test = load_manifest(split_path(cfg, "test"))
    unlabeled = load_manifest(split_path(cfg, "unlabeled")) if method.unlabeled_views else None
    for other in (test, unlabeled):
        if other is None:
            continue
        # an unlabeled pool without classes (`shards write images`) has num_classes 0 and no truth
        classes_differ = other.num_classes != labeled.num_classes and not (other is unlabeled and other.num_classes == 0)
        if classes_differ or other.shape != labeled.shape:
            raise UserError(
                f"split {other.root} ({other.num_classes} classes, shape {other.shape}) does not match "
                f"{labeled.root} ({labeled.num_classes} classes, shape {labeled.shape})"
            )
    if unlabeled is not None and unlabeled.num_samples == 0:
        raise UserError(f"split {unlabeled.root} is empty; method '{cfg.method.name}' needs unlabeled data")
    return RunData(labeled, unlabeled, test)


def per_rank(total: int, world: int, name: str) -> int:
    if total % world:
        raise UserError(f"{name}={total} is not divisible by the {world} processes; choose a multiple of {world}")
    return total // world


def _compatible(meta: dict, expected: dict, path: Path) -> None:
    for key, value in expected.items():
        if meta.get(key) != value:
            raise UserError(
                f"checkpoint {path} is incompatible with this config: {key} is {meta.get(key)!r} there, "
                f"{value!r} here (use another train.output_dir, or train.resume=never)"
            )


def _init_from(nets: dict, path: str, identity: dict) -> None:
    """Start every network from the evaluated weights (EMA when saved) of another run's checkpoint."""
    source = checkpoint.resolve(path)
    meta = checkpoint.check_ours(source)
    for key in ("model", "num_classes", "input_shape"):
        if meta.get(key) != identity[key]:
            raise UserError(f"train.init_from={path}: its {key} is {meta.get(key)!r}, this run's is {identity[key]!r}")
    weights, _ = checkpoint.network_weights(source)
    for net in nets.values():
        net.load_state_dict(weights)


def train(cfg: Config) -> dict:
    method_cls = get_method(cfg.method.name)
    data = load_run_data(cfg, method_cls)
    accelerator = make_accelerator(cfg.train.mixed_precision)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    labeled_batch = per_rank(cfg.data.batch_size, world, "data.batch_size")
    unlabeled_batch = per_rank(cfg.data.batch_size * cfg.data.unlabeled_batch_ratio, world, "data.batch_size * data.unlabeled_batch_ratio")
    if method_cls.unlabeled_views and unlabeled_batch == 0:
        raise UserError(f"method '{cfg.method.name}' needs unlabeled data: set data.unlabeled_batch_ratio >= 1")

    run_dir = Path(cfg.train.output_dir)
    ckpt_root = run_dir / "checkpoints"
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = checkpoint.latest(ckpt_root)
    elif cfg.train.resume != "never":
        resume_from = checkpoint.resolve(cfg.train.resume)
    identity = {
        "method": cfg.method.name,
        "model": cfg.model.name,
        "num_classes": data.labeled.num_classes,
        "input_shape": list(data.labeled.input_shape),
    }
    saved_world = world
    if resume_from is not None:
        saved = checkpoint.check_ours(resume_from)
        _compatible(saved, identity, resume_from)
        saved_world = saved.get("world_size", world)

    # Same initial weights on every rank; then each rank its own dropout stream.
    torch.manual_seed(cfg.train.seed)
    total = cfg.train.total_steps
    nets = {role: build_model(cfg.model, data.labeled.num_classes, data.labeled.input_shape) for role in method_cls.roles}
    if cfg.train.init_from and resume_from is None:
        _init_from(nets, cfg.train.init_from, identity)
    optimizers = {role: build_optimizer(net, cfg.optim) for role, net in nets.items()}
    schedulers = {role: build_scheduler(opt, total, cfg.optim) for role, opt in optimizers.items()}
    emas = {}
    if cfg.train.ema_decay > 0:
        emas = {role: AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True) for role, net in nets.items()}
    method = method_cls(cfg, {}, data.labeled.num_classes)
    state = {"step": 0, "wall_seconds": 0.0, "history": []}
    streams_state: dict = {}
    if resume_from is not None:
        models = checkpoint.load_file(resume_from / "model.pt")
        training = checkpoint.load_file(resume_from / "training.pt")
        mine = checkpoint.load_file(resume_from / f"rank-{rank:05d}.pt") if rank < saved_world else None
        for role, net in nets.items():
            net.load_state_dict(models["nets"][role])
            optimizers[role].load_state_dict(training["optimizers"][role])
            schedulers[role].load_state_dict(training["schedulers"][role])
        for role, ema in emas.items():
            ema.load_state_dict(models["emas"][role])
        method.load_state_dict(training["method"])
        state = training["state"]
        if mine is not None:
            checkpoint.set_rng_state(mine["rng"])
        else:  # a rank the saved run did not have
            torch.manual_seed(mix(cfg.train.seed, 1, rank, state["step"]))
        slots = max(cfg.data.workers, 1)
        if saved_world == world and all(s["workers"] == slots for s in mine["streams"].values()):
            streams_state = mine["streams"]
        else:  # another layout: the streams redistribute what every saved rank had left (data.streams)
            every = [checkpoint.load_file(resume_from / f"rank-{r:05d}.pt")["streams"] for r in range(saved_world)]
            streams_state = {name: [ranks[name] for ranks in every] for name in every[0]}
    else:
        torch.manual_seed(mix(cfg.train.seed, 1, rank))
    for role in nets:
        nets[role], optimizers[role] = accelerator.prepare(nets[role], optimizers[role])
    for ema in emas.values():
        ema.to(device)
    method.nets = nets
    raw = {role: accelerator.unwrap_model(net) for role, net in nets.items()}  # once: unwrapping probes for DeepSpeed

    views = build_views(data.labeled.kind, data.labeled.input_shape, data.labeled.data["mean"], data.labeled.data["std"], cfg.data.augment)
    workers = cfg.data.workers
    labeled_stream = TrainStream(
        data.labeled, labeled_batch, {method_cls.labeled_view: views[method_cls.labeled_view]}, rank, world, workers,
        mix(cfg.data.seed, 1), cfg.data.shuffle_buffer, streams_state.get("labeled"), cfg.data.max_bad_fraction,
    )
    unlabeled_stream = None
    if data.unlabeled is not None:
        unlabeled_stream = TrainStream(
            data.unlabeled, unlabeled_batch, {v: views[v] for v in method_cls.unlabeled_views}, rank, world, workers,
            mix(cfg.data.seed, 2), cfg.data.shuffle_buffer, streams_state.get("unlabeled"), cfg.data.max_bad_fraction,
        )

    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    logger = RunLogger(run_dir, accelerator, total, state["step"])
    if resume_from is not None:
        layout = f" (saved by {saved_world} processes, continuing on {world})" if saved_world != world else ""
        logger.line(f"resumed from {resume_from} at step {state['step']}{layout}")

    def optimize(role: str, loss: torch.Tensor) -> None:
        optimizer = optimizers[role]
        accelerator.backward(loss)
        if cfg.optim.grad_clip > 0:
            accelerator.clip_grad_norm_(nets[role].parameters(), cfg.optim.grad_clip)
        optimizer.step()
        schedulers[role].step()
        optimizer.zero_grad(set_to_none=True)
        if role in emas:
            emas[role].update_parameters(raw[role])

    eval_net = emas[method_cls.eval_role] if emas else raw[method_cls.eval_role]
    samples_per_step = cfg.data.batch_size + (cfg.data.batch_size * cfg.data.unlabeled_batch_ratio if unlabeled_stream else 0)

    def run_eval(step: int) -> dict:
        result = evaluate(eval_net, data.test, views["plain"], accelerator, cfg.data.eval_batch_size, workers, cfg.data.max_bad_fraction)
        logger.scalars("eval", {"accuracy": result["accuracy"], "loss": result["loss"]}, step)
        state["history"].append({"step": step, "epoch": step / cfg.train.steps_per_epoch, **result})
        return result

    def save_checkpoint(step: int) -> None:
        state["wall_seconds"] = wall_before + time.time() - session_start
        shared = {
            "model": {"nets": {r: n.state_dict() for r, n in raw.items()}, "emas": {r: e.state_dict() for r, e in emas.items()}},
            "training": {
                "optimizers": {r: o.state_dict() for r, o in optimizers.items()},
                "schedulers": {r: s.state_dict() for r, s in schedulers.items()},
                "method": method.state_dict(),
                "state": state,
            },
        }
        streams = {"labeled": labeled_stream.state_dict()}
        if unlabeled_stream is not None:
            streams["unlabeled"] = unlabeled_stream.state_dict()
        meta = dict(identity, roles=list(method_cls.roles), eval_role=method_cls.eval_role, world_size=world,
                    epoch=step / cfg.train.steps_per_epoch, dataset=data.source, ema=bool(emas),
                    mean=data.labeled.data["mean"], std=data.labeled.data["std"])
        checkpoint.save(ckpt_root, step, accelerator, shared, {"rng": checkpoint.rng_state(), "streams": streams}, meta,
                        yaml.safe_dump(to_dict(cfg), sort_keys=False), cfg.train.keep_last)

    session_start, wall_before, start_step = time.time(), state["wall_seconds"], state["step"]
    train_streams = {"labeled": labeled_stream, "unlabeled": unlabeled_stream} if unlabeled_stream else {"labeled": labeled_stream}
    labeled_batches = iter(loader(labeled_stream, workers))
    unlabeled_batches = iter(loader(unlabeled_stream, workers)) if unlabeled_stream is not None else None
    last_eval = None
    for step in range(start_step, total):
        labeled = labeled_stream.observe(next(labeled_batches))
        target = labeled.get("soft", labeled["label"])  # class probabilities on a split of soft pseudo-labels
        batch = TrainBatch(labeled["inputs"][method_cls.labeled_view].to(device, non_blocking=True), target.to(device, non_blocking=True))
        truth = None
        if unlabeled_batches is not None:
            unlabeled = unlabeled_stream.observe(next(unlabeled_batches))
            batch.unlabeled = {v: unlabeled["inputs"][v].to(device, non_blocking=True) for v in method_cls.unlabeled_views}
            truth = unlabeled["truth"]  # stays here: monitoring only, never handed to the method
        lr = schedulers[method_cls.eval_role].get_last_lr()[0]
        out = method.train_step(batch, StepContext(step, step / cfg.train.steps_per_epoch, total, optimize))
        logger.accumulate(dict(out.metrics, lr=lr))
        if out.pseudo_labels is not None and truth is not None:
            known = truth >= 0
            correct = (out.pseudo_labels.cpu() == truth) & known
            used = out.mask.cpu() & known
            logger.accumulate_ratio("pseudo_label_accuracy", correct.sum(), known.sum())
            logger.accumulate_ratio("pseudo_label_accuracy_used", (correct & used).sum(), used.sum())
        logger.advance()
        done = step + 1
        if done % cfg.train.log_every_steps == 0 or done == total:
            for name, stream in train_streams.items():  # cumulative, over all ranks
                logger.accumulate_ratio(f"corrupt_fraction_{name}", stream.corrupt_samples, stream.samples_read)
            logger.flush(done)
        if done % cfg.train.steps_per_epoch == 0 or done == total:
            epoch = -(-done // cfg.train.steps_per_epoch)
            state["step"] = done
            if epoch % cfg.train.eval_every_epochs == 0 or done == total:
                last_eval = run_eval(done)
                logger.line(f"epoch {epoch}/{cfg.train.epochs} step {done}: test accuracy {last_eval['accuracy']:.4f} loss {last_eval['loss']:.4f}")
            if epoch % cfg.train.checkpoint_every_epochs == 0 or done == total:
                save_checkpoint(done)
    if last_eval is None:  # resumed at the end: report the finished run again
        last_eval = run_eval(total)
        save_checkpoint(total)
    session_seconds = time.time() - session_start
    corrupt = torch.tensor([s.corrupt_samples for s in train_streams.values()], dtype=torch.float64, device=device)
    if world > 1:
        corrupt = accelerator.reduce(corrupt, "sum")
    results = {
        "method": cfg.method.name,
        "dataset": data.source,
        "labels": data.labeled.num_samples,
        "labels_per_class": data.labeled.data.get("protocol", {}).get("labels_per_class"),
        "test_accuracy": last_eval["accuracy"],
        "test_loss": last_eval["loss"],
        "best_test_accuracy": max(h["accuracy"] for h in state["history"]),
        "evaluated_weights": "ema" if emas else "raw",
        "steps": total,
        "world_size": world,
        "wall_seconds": wall_before + session_seconds,
        "train_samples_per_second": (total - start_step) * samples_per_step / session_seconds if total > start_step else None,
        "corrupt_samples": {name: int(n) for name, n in zip(train_streams, corrupt.tolist())},
        "run_dir": str(run_dir),
    }
    if accelerator.is_main_process:
        checkpoint.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
        logger.line(f"{cfg.method.name}: test accuracy {results['test_accuracy']:.4f} ({run_dir / 'results.json'})")
    logger.close()
    accelerator.wait_for_everyone()
    return results
