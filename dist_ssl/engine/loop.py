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
from accelerate.utils import DistributedType, set_seed
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_ssl.config import Config, role_model, save_config, to_dict
from dist_ssl.data.shards import Manifest, load_manifest
from dist_ssl.data.streams import TrainStream, loader, mix
from dist_ssl.data.transforms import build_views
from dist_ssl.engine import checkpoint, preemption
from dist_ssl.engine.accelerator import make_accelerator
from dist_ssl.engine.evaluate import evaluate
from dist_ssl.engine.finetune import finetune_config
from dist_ssl.engine.logging import RunLogger
from dist_ssl.engine.optim import Stepper, build_optimizer, build_scheduler
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
    labeled = load_manifest(split_path(cfg, "labeled"), cfg.data.allow_pipe)
    test = load_manifest(split_path(cfg, "test"), cfg.data.allow_pipe)
    unlabeled = load_manifest(split_path(cfg, "unlabeled"), cfg.data.allow_pipe) if method.unlabeled_views else None
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


def check_deepspeed(distributed_type, method: str, optimizers: list[str]) -> None:
    """A DeepSpeed engine owns one model and one optimizer, and accelerator.backward() drives the last
    prepared engine only: a second optimizer (MPL's teacher, SMPL's pseudo step) would be silently
    wrong, so such methods are refused under DeepSpeed."""
    if distributed_type == DistributedType.DEEPSPEED and len(optimizers) > 1:
        raise UserError(
            f"method '{method}' steps {len(optimizers)} optimizers ({', '.join(optimizers)}); DeepSpeed runs one per "
            "process group: launch it with DDP (accelerate launch --multi_gpu)"
        )


def _init_from(nets: dict, path: str, cfg: Config, data: RunData) -> None:
    """Start every network from the evaluated weights (EMA when saved) of another run's checkpoint,
    refused with a clear error when it is another model or was trained for other classes or inputs."""
    source = checkpoint.resolve(path)
    meta = checkpoint.check_ours(source)
    weights, _ = checkpoint.network_weights(source)
    theirs = (meta["model"], meta["num_classes"], meta["input_shape"])
    for role, net in nets.items():
        ours = (role_model(cfg, role).name, data.labeled.num_classes, list(data.labeled.input_shape))
        if theirs != ours:
            raise UserError(
                f"train.init_from={path}: that checkpoint holds {theirs[0]} for {theirs[1]} classes and inputs {theirs[2]}, "
                f"this run trains {ours[0]} for {ours[1]} classes and inputs {ours[2]}"
            )
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
    if cfg.train.resume != "auto":
        start = 0 if resume_from is None else int(checkpoint.check_ours(resume_from)["step"])
        checkpoint.refuse_to_mix(ckpt_root, start, f"train.resume={cfg.train.resume}")
    identity = {
        "method": cfg.method.name,
        "model": role_model(cfg, method_cls.eval_role).name,
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
    nets = {role: build_model(role_model(cfg, role), data.labeled.num_classes, data.labeled.input_shape) for role in method_cls.roles}
    if cfg.train.init_from and resume_from is None:
        _init_from(nets, cfg.train.init_from, cfg, data)
    specs = method_cls.optimizer_specs(cfg)
    for name, spec in specs.items():
        if spec.wait_steps >= total:
            raise UserError(f"optimizer '{name}' waits {spec.wait_steps} steps, but the run has only {total} (train.epochs x train.steps_per_epoch)")
    optimizers = {name: build_optimizer(nets[spec.net], spec.optim) for name, spec in specs.items()}
    schedulers = {name: build_scheduler(optimizers[name], total - spec.wait_steps, spec.optim) for name, spec in specs.items()}
    emas = {}
    if cfg.train.ema_decay > 0:  # of the evaluated network only (MPL: the student's, not the teacher's)
        role = method_cls.eval_role
        emas = {role: AveragedModel(nets[role], multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)}
    method = method_cls(cfg, {}, data.labeled.num_classes)
    state = {"step": 0, "wall_seconds": 0.0, "history": []}
    streams_state: dict = {}
    mine: dict | None = None
    if resume_from is not None:
        # A rank the saved run did not have (more processes now) has no file of its own.
        state, mine = checkpoint.restore(resume_from, rank if rank < saved_world else None, nets, emas, optimizers, schedulers, accelerator.scaler)
        method.load_state_dict((mine if mine is not None else checkpoint.rank_file(resume_from, 0))["method"])
        slots = max(cfg.data.workers, 1)
        if saved_world == world and all(s["workers"] == slots for s in mine["streams"].values()):
            streams_state = mine["streams"]
        else:  # another layout: the streams redistribute what every saved rank had left (data.streams)
            every = [checkpoint.rank_file(resume_from, r)["streams"] for r in range(saved_world)]
            streams_state = {name: [ranks[name] for ranks in every] for name in every[0]}
    check_deepspeed(accelerator.distributed_type, cfg.method.name, list(optimizers))
    for role in nets:
        nets[role] = accelerator.prepare(nets[role])
    for name in optimizers:
        optimizers[name] = accelerator.prepare(optimizers[name])
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
        if mine is not None:
            logger.load_state_dict(mine["logger"])
        layout = f" (saved by {saved_world} processes, continuing on {world})" if saved_world != world else ""
        logger.line(f"resumed from {resume_from} at step {state['step']}{layout}")
        changes = checkpoint.config_changes(resume_from, to_dict(cfg))
        if changes:
            logger.line(f"resuming with a changed config (the run will differ from the uninterrupted one): {'; '.join(changes)}")

    optimize = Stepper(accelerator, nets, specs, optimizers, schedulers)

    eval_net = emas[method_cls.eval_role] if emas else raw[method_cls.eval_role]
    samples_per_step = cfg.data.batch_size + (cfg.data.batch_size * cfg.data.unlabeled_batch_ratio if unlabeled_stream else 0)

    def run_eval(step: int) -> dict:
        checkpoint.sync_buffers([*raw.values(), *emas.values()], accelerator)
        with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed: keep that out of the training RNG
            result = evaluate(eval_net, data.test, views["plain"], accelerator, cfg.data.eval_batch_size, workers, cfg.data.max_bad_fraction)
        logger.scalars("eval", {"accuracy": result["accuracy"], "loss": result["loss"]}, step)
        state["history"].append({"step": step, "epoch": step / cfg.train.steps_per_epoch, **result})
        return result

    def save_checkpoint(step: int, reason: str) -> Path:
        started = time.time()
        state["step"] = step
        state["wall_seconds"] = wall_before + started - session_start
        checkpoint.sync_buffers([*raw.values(), *emas.values()], accelerator)
        shared = checkpoint.snapshot(raw, emas, optimizers, schedulers, accelerator.scaler, state)
        streams = {"labeled": labeled_stream.state_dict()}
        if unlabeled_stream is not None:
            streams["unlabeled"] = unlabeled_stream.state_dict()
        own = {"rng": checkpoint.rng_state(), "streams": streams, "method": method.state_dict(), "logger": logger.state_dict()}
        meta = dict(identity, roles=list(method_cls.roles), eval_role=method_cls.eval_role, world_size=world,
                    epoch=step / cfg.train.steps_per_epoch, dataset=data.source, ema=bool(emas),
                    mean=data.labeled.data["mean"], std=data.labeled.data["std"], reason=reason)
        path = checkpoint.save(ckpt_root, step, accelerator, shared, own, meta, yaml.safe_dump(to_dict(cfg), sort_keys=False), cfg.train.keep_last)
        logger.scalars("checkpoint", {"save_seconds": time.time() - started}, step)
        return path

    session_start, wall_before, start_step = time.time(), state["wall_seconds"], state["step"]
    train_streams = {"labeled": labeled_stream, "unlabeled": unlabeled_stream} if unlabeled_stream else {"labeled": labeled_stream}
    labeled_batches = iter(loader(labeled_stream, workers))
    unlabeled_batches = iter(loader(unlabeled_stream, workers)) if unlabeled_stream is not None else None
    # Creating a DataLoader iterator draws a seed from the global RNG: set each rank's RNGs (python,
    # numpy, torch, CUDA: all that a checkpoint saves) after that, or a resumed run would drift.
    if mine is not None:
        checkpoint.set_rng_state(mine["rng"])
    else:  # a fresh run, or a rank the saved run did not have
        set_seed(mix(cfg.train.seed, 1, rank, state["step"]) % 2**32)
    boundary = preemption.StepBoundary(cfg.train, accelerator)
    stopped = None
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
        rates = {"lr" if name == method_cls.eval_role else f"lr_{name}": schedulers[name].get_last_lr()[0] for name in schedulers}
        optimize.step = step
        out = method.train_step(batch, StepContext(step, step / cfg.train.steps_per_epoch, total, optimize, optimize.reduce_sum))
        for role, ema in emas.items():
            ema.update_parameters(raw[role])
        logger.accumulate(dict(out.metrics, **rates))
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
            if epoch % cfg.train.eval_every_epochs == 0 or done == total:
                last_eval = run_eval(done)
                logger.line(f"epoch {epoch}/{cfg.train.epochs} step {done}: test accuracy {last_eval['accuracy']:.4f} loss {last_eval['loss']:.4f}")
        decision = boundary.decide(done)
        if decision.checkpoint:
            path = save_checkpoint(done, decision.checkpoint)
        if decision.stop:
            stopped = preemption.Preempted(decision.stop, done, path)
            break
    if stopped is not None:
        logger.close()
        accelerator.wait_for_everyone()
        raise stopped
    if last_eval is None:  # resumed at the end: report the finished run again
        last_eval = run_eval(total)
        save_checkpoint(total, "end")
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
    if cfg.train.finetune.epochs > 0:
        tuned = train(finetune_config(cfg, checkpoint.latest(ckpt_root), data.labeled.num_samples))
        results["finetuned"] = {k: tuned[k] for k in ("test_accuracy", "test_loss", "best_test_accuracy", "steps", "wall_seconds", "run_dir")}
        if accelerator.is_main_process:
            checkpoint.atomic_write_text(run_dir / "results.json", json.dumps(results, indent=1))
        accelerator.wait_for_everyone()
    return results
