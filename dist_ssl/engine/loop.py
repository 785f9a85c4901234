"""The training loop: the only place that calls backward, clips, scales and steps optimizers.

Runs the same under `dist-ssl train` (one process) and `accelerate launch` (N processes, DDP over
gloo on CPU or NCCL on GPUs). Batch sizes in the config are global: each rank takes its share, so
a run means the same thing on 1 or 8 processes.

Shaped like torchtitan's Trainer: `Trainer(cfg)` builds a run once (data, networks, optimizers,
EMA, streams, logger, checkpointer) and restores it from its newest checkpoint; `fit()` calls a
short `train_step` per step, evaluates and checkpoints at the step boundaries, and `finish()`
writes the results.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from accelerate.utils import DistributedType
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from dist_ssl.config import Config, role_model, save_config, to_dict
from dist_ssl.data import device_views
from dist_ssl.data.loading import loader
from dist_ssl.data.shards import tar
from dist_ssl.data.shards.manifest import Manifest, load_manifest
from dist_ssl.data.streams import TrainStream, mix
from dist_ssl.data.transforms import build_views
from dist_ssl.engine import checkpoint, preemption, sync_batchnorm
from dist_ssl.engine.accelerator import launch_facts, make_accelerator, prepare_training
from dist_ssl.engine.allocator import allocator_facts, keep_freed_memory
from dist_ssl.engine.evaluate import eval_batches, evaluate, first_samples, predict
from dist_ssl.engine.finetune import finetune_config
from dist_ssl.engine.logging import (
    RunLogger,
    confusion_figure,
    flat_settings,
    pseudo_label_figure,
)
from dist_ssl.engine.optim import Stepper, build_optimizer, build_scheduler
from dist_ssl.errors import UserError
from dist_ssl.methods import get_method
from dist_ssl.methods.base import Method, StepContext, StepOutput, TrainBatch
from dist_ssl.models import build_model

GRID_SAMPLES = 25  # unlabeled samples in TensorBoard's pseudo-label grid


@dataclass
class RunData:
    labeled: Manifest
    unlabeled: Manifest | None
    test: Manifest

    @property
    def source(self) -> str:
        return self.labeled.data.get("source", "?")


def run_settings(cfg: Config) -> dict:
    """The resolved config's scalar settings by dotted name, for TensorBoard's HParams dashboard;
    of the per-method sections, only this run's method's (and the keys every method shares)."""
    tree = to_dict(cfg)
    shared = {key: value for key, value in tree["method"].items() if not isinstance(value, dict)}
    tree["method"] = dict(shared, **{cfg.method.name: tree["method"].get(cfg.method.name, {})})
    return dict(flat_settings(tree), **{"train.total_steps": cfg.train.total_steps})


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


def resume_point(cfg: Config, ckpt_root: Path, identity: dict) -> tuple[Path | None, dict | None]:
    """The checkpoint this run continues from (train.resume) and its meta, checked against the run."""
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = checkpoint.latest(ckpt_root)
    elif cfg.train.resume != "never":
        resume_from = checkpoint.resolve(cfg.train.resume)
    if cfg.train.resume != "auto":
        start = 0 if resume_from is None else int(checkpoint.check_ours(resume_from)["step"])
        checkpoint.refuse_to_mix(ckpt_root, start, f"train.resume={cfg.train.resume}")
    if resume_from is None:
        return None, None
    meta = checkpoint.check_ours(resume_from)
    _compatible(meta, identity, resume_from)
    return resume_from, meta


def batched_views_wanted(cfg: Config) -> bool:
    """data.augment.path: `auto` is the batched path, the faster one wherever it was measured (8x8
    and 32x32 on CPU cores; docs/speed.md); both give the same views bit for bit."""
    return cfg.data.augment.path in ("auto", "batched")


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.method_cls = method_cls = get_method(cfg.method.name)
        self.data = data = load_run_data(cfg, method_cls)
        self.accelerator = accelerator = make_accelerator(cfg.train.mixed_precision)
        self.rank, self.world, self.device = accelerator.process_index, accelerator.num_processes, accelerator.device
        self.retains_memory = self.device.type == "cpu" and cfg.train.cpu_allocator == "retain" and keep_freed_memory()
        self.run_dir = Path(cfg.train.output_dir)
        self.identity = {
            "method": cfg.method.name,
            "model": role_model(cfg, method_cls.eval_role).name,
            "num_classes": data.labeled.num_classes,
            "input_shape": list(data.labeled.input_shape),
        }
        self.resume_from, saved = resume_point(cfg, self.run_dir / "checkpoints", self.identity)
        self.saved_world = saved.get("world_size", self.world) if saved else self.world
        start_step = int(saved["step"]) if saved else 0
        self._build_networks()
        self._build_streams()
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        accelerator.wait_for_everyone()
        self.logger = RunLogger(self.run_dir, accelerator, cfg.train.total_steps, start_step)
        self.rng = checkpoint.RngState(mix(cfg.train.seed, 1, self.rank, start_step) % 2**32)
        own = {"rng": self.rng, "streams": _StreamsPiece(self.streams), "method": checkpoint.RankPiece(self.method, "rank0"),
               "logger": checkpoint.RankPiece(self.logger)}
        meta = dict(self.identity, roles=list(method_cls.roles), eval_role=method_cls.eval_role, dataset=data.source,
                    ema=bool(self.emas), mean=data.labeled.data["mean"], std=data.labeled.data["std"])
        self.checkpointer = checkpoint.Checkpointer(
            self.run_dir / "checkpoints", accelerator, self.raw, self.emas, self.optimizers, self.schedulers, own, meta,
            yaml.safe_dump(to_dict(cfg), sort_keys=False), cfg.train.keep_last, cfg.train.steps_per_epoch)
        self.state = {"step": 0, "wall_seconds": 0.0, "history": []}
        self.grid_samples = None  # read at the first evaluation (`_log_pseudo_label_grid`)
        if self.resume_from is not None:
            self.state = self.checkpointer.restore(self.resume_from)
            self._report_resume()
        self._prepare()

    # -- building ----------------------------------------------------------------------------------
    def _build_networks(self) -> None:
        cfg, data, method_cls = self.cfg, self.data, self.method_cls
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank
        total = cfg.train.total_steps
        shape = data.labeled.input_shape
        self.nets = {role: build_model(role_model(cfg, role), data.labeled.num_classes, shape) for role in method_cls.roles}
        if cfg.train.init_from and self.resume_from is None:
            _init_from(self.nets, cfg.train.init_from, cfg, data)
        self.specs = method_cls.optimizer_specs(cfg)
        for name, spec in self.specs.items():
            if spec.wait_steps >= total:
                raise UserError(f"optimizer '{name}' waits {spec.wait_steps} steps, but the run has only {total} (train.epochs x train.steps_per_epoch)")
        self.optimizers = {name: build_optimizer(self.nets[spec.net], spec.optim) for name, spec in self.specs.items()}
        self.schedulers = {name: build_scheduler(self.optimizers[name], total - spec.wait_steps, spec.optim) for name, spec in self.specs.items()}
        self.emas = {}
        if cfg.train.ema_decay > 0:  # of the evaluated network only (MPL: the student's, not the teacher's)
            role = method_cls.eval_role
            self.emas = {role: AveragedModel(self.nets[role], multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay), use_buffers=True)}
        self.raw = dict(self.nets)  # the unwrapped networks: checkpoints and evaluation read these
        self.method = method_cls(self.cfg, {}, data.labeled.num_classes, data.unlabeled.num_samples if data.unlabeled else 0)

    def _build_streams(self) -> None:
        cfg, data, method_cls = self.cfg, self.data, self.method_cls
        labeled_batch = per_rank(cfg.data.batch_size, self.world, "data.batch_size")
        unlabeled_batch = per_rank(cfg.data.batch_size * cfg.data.unlabeled_batch_ratio, self.world, "data.batch_size * data.unlabeled_batch_ratio")
        if method_cls.unlabeled_views and unlabeled_batch == 0:
            raise UserError(f"method '{cfg.method.name}' needs unlabeled data: set data.unlabeled_batch_ratio >= 1")
        kind, shape, mean, std = data.labeled.kind, data.labeled.input_shape, data.labeled.data["mean"], data.labeled.data["std"]
        self.views = build_views(kind, shape, mean, std, cfg.data.augment)
        train_views = device_views.build_batched_views(kind, shape, mean, std, cfg.data.augment) if batched_views_wanted(cfg) else self.views
        needed = {"labeled": (data.labeled, labeled_batch, (method_cls.labeled_view,), 1)}
        if data.unlabeled is not None:
            needed["unlabeled"] = (data.unlabeled, unlabeled_batch, method_cls.unlabeled_views, 2)
        self.train_views = train_views
        self.streams = {
            name: TrainStream(manifest, batch, {v: train_views[v] for v in view_names}, self.rank, self.world, cfg.data.workers,
                              mix(cfg.data.seed, salt), cfg.data.shuffle_buffer, None, cfg.data.max_bad_fraction, cfg.data.virtual_consumers)
            for name, (manifest, batch, view_names, salt) in needed.items()
        }

    def _report_resume(self) -> None:
        layout = f" (saved by {self.saved_world} processes, continuing on {self.world})" if self.saved_world != self.world else ""
        self.logger.line(f"resumed from {self.resume_from} at step {self.state['step']}{layout}")
        changes = checkpoint.config_changes(self.resume_from, to_dict(self.cfg))
        if changes:
            self.logger.line(f"resuming with a changed config (the run will differ from the uninterrupted one): {'; '.join(changes)}")
        for stream in self.streams.values():
            if stream.notice:
                self.logger.line(f"warning: {stream.notice}")

    def _prepare(self) -> None:
        """Hand the networks and optimizers to accelerate (DDP, mixed precision) and lay the
        networks out as the run asks (train.channels_last)."""
        accelerator = self.accelerator
        check_deepspeed(accelerator.distributed_type, self.cfg.method.name, list(self.optimizers))
        memory_format = torch.channels_last if self.cfg.train.channels_last and len(self.data.labeled.input_shape) == 3 else None
        if memory_format is not None:
            for net in self.nets.values():
                net.to(memory_format=memory_format)
        if self.cfg.train.sync_batchnorm:  # the same parameter objects: the optimizers built on them stay valid
            self.nets = {role: sync_batchnorm.convert(net, self.device) for role, net in self.nets.items()}
        prepare_training(accelerator, self.nets, self.optimizers, self.specs, self.cfg.data.batch_size // self.world)
        for role in self.nets:
            self.raw[role] = accelerator.unwrap_model(self.nets[role])  # once: unwrapping probes for DeepSpeed
        for ema in self.emas.values():
            ema.to(self.device)
        self.memory_format = memory_format
        if self.cfg.train.compile:
            self.nets = {role: torch.compile(net) for role, net in self.nets.items()}
        self.method.nets = self.nets
        self.optimize = Stepper(accelerator, self.nets, self.specs, self.optimizers, self.schedulers)

    # -- the step ----------------------------------------------------------------------------------
    def _views(self, batch: dict) -> dict[str, torch.Tensor]:
        views = device_views.on_device(batch, self.train_views, self.device)
        if self.memory_format is not None:
            views = {name: x.contiguous(memory_format=self.memory_format) for name, x in views.items()}
        return views

    def train_step(self, step: int, labeled: dict, unlabeled: dict | None) -> StepOutput:
        """One step on one labeled (and unlabeled) batch: views on the device, the method's losses
        and optimizer steps, the EMA, the metrics of the logging window."""
        cfg, method_cls = self.cfg, self.method_cls
        target = labeled.get("soft", labeled["label"])  # class probabilities on a split of soft pseudo-labels
        batch = TrainBatch(self._views(labeled)[method_cls.labeled_view], target.to(self.device, non_blocking=True))
        if unlabeled is not None:
            batch.unlabeled = self._views(unlabeled)
            batch.unlabeled_index = unlabeled["index"].to(self.device, non_blocking=True)
        rates = {"lr" if name == method_cls.eval_role else f"lr_{name}": s.get_last_lr()[0] for name, s in self.schedulers.items()}
        self.optimize.step = step
        ctx = StepContext(step, step / cfg.train.steps_per_epoch, cfg.train.total_steps, self.optimize, self.optimize.reduce_sum, self.optimize.gather)
        out = self.method.train_step(batch, ctx)
        for role, ema in self.emas.items():
            ema.update_parameters(self.raw[role])
        self.logger.accumulate(dict(out.metrics, **rates))
        if out.pseudo_labels is not None and unlabeled is not None:
            truth = unlabeled["truth"].to(out.pseudo_labels.device)  # monitoring only, never handed to the method
            known = truth >= 0
            correct = (out.pseudo_labels == truth) & known
            used = out.mask & known
            self.logger.accumulate_ratio("pseudo_label_accuracy", correct.sum(), known.sum())
            self.logger.accumulate_ratio("pseudo_label_accuracy_used", (correct & used).sum(), used.sum())
            self.logger.accumulate_counts("pseudo_labels", self._class_counts(out.pseudo_labels, out.mask))
        self.logger.advance()
        return out

    def _class_counts(self, labels: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """How many of the used pseudo-labels are of each class; a comparison rather than bincount
        or one_hot, which would wait for the device to learn the largest label."""
        classes = torch.arange(self.data.labeled.num_classes, device=labels.device)
        return ((labels[:, None] == classes) & used[:, None]).sum(dim=0)

    # -- the loop ----------------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        # shard reads retried after a transient storage error: saved ones, then this process tree's
        self.retries_before, self.retries_at_start = self.state.get("storage_retries", 0), tar.retries_so_far()
        batches = {name: device_views.Prefetcher(loader(stream, cfg.data.workers), self.device) for name, stream in self.streams.items()}
        # the evaluations' workers are forked once, now, with the training ones (data/loading.py says why)
        self.test_batches = eval_batches(self.data.test, self.views["plain"], self.accelerator, cfg.data.eval_batch_size,
                                         cfg.data.workers, cfg.data.max_bad_fraction, persistent=True).start()
        try:
            return self._fit(batches)
        finally:
            self.test_batches.close()

    def _fit(self, batches: dict) -> dict:
        cfg, total = self.cfg, self.cfg.train.total_steps
        self.session_start, self.wall_before, start_step = time.time(), self.state["wall_seconds"], self.state["step"]
        self.rng.apply()  # after the loaders exist (see RngState)
        boundary = preemption.StepBoundary(cfg.train, self.accelerator)
        last_eval = None
        window = (time.perf_counter(), 0.0, start_step)  # the logging window's start: clock, data wait, step
        for step in range(start_step, total):
            labeled = self.streams["labeled"].observe(batches["labeled"].next())
            unlabeled = self.streams["unlabeled"].observe(batches["unlabeled"].next()) if "unlabeled" in batches else None
            self.train_step(step, labeled, unlabeled)
            done = step + 1
            if done % cfg.train.log_every_steps == 0 or done == total:
                window = self._flush(done, window, sum(b.waited for b in batches.values()))
            elif self.logger.progress_due(done):
                self.logger.progress_line(done, self._speed(done, window, sum(b.waited for b in batches.values())))
            if done % cfg.train.steps_per_epoch == 0 or done == total:
                epoch = -(-done // cfg.train.steps_per_epoch)
                if epoch % cfg.train.eval_every_epochs == 0 or done == total:
                    last_eval = self.evaluate(done)
                    self.logger.line(f"epoch {epoch}/{cfg.train.epochs} step {done}: test accuracy {last_eval['accuracy']:.4f} loss {last_eval['loss']:.4f}")
            decision = boundary.decide(done)
            if decision.checkpoint:
                path = self.save(done, decision.checkpoint)
            if decision.stop:
                self.logger.close()
                self.accelerator.wait_for_everyone()
                raise preemption.Preempted(decision.stop, f"at step {done} after committing {path}", done, path)
        self.data_wait_seconds = sum(b.waited for b in batches.values())
        if last_eval is None:  # resumed at the end: report the finished run again
            last_eval = self.evaluate(total)
            self.save(total, "end")
        return self.finish(last_eval, start_step)

    def _flush(self, done: int, window: tuple[float, float, int], waited: float) -> tuple[float, float, int]:
        """Log the window: its metrics, the corrupt fractions so far, images/s and the fraction of
        the window spent waiting for data. Returns the next window's start."""
        for name, stream in self.streams.items():  # cumulative, over all ranks
            self.logger.accumulate_ratio(f"corrupt_fraction_{name}", stream.corrupt_samples, stream.samples_read)
        self.logger.accumulate(self._speed(done, window, waited))
        self.logger.flush(done)
        return time.perf_counter(), waited, done

    def _speed(self, done: int, window: tuple[float, float, int], waited: float) -> dict[str, float]:
        """Images/s and the fraction of the time spent waiting for data since the window started."""
        started, waited_before, step_before = window
        seconds = max(time.perf_counter() - started, 1e-9)
        return {"images_per_second": (done - step_before) * self.samples_per_step / seconds,
                "data_wait_fraction": min((waited - waited_before) / seconds, 1.0)}

    @property
    def samples_per_step(self) -> int:
        cfg = self.cfg
        return cfg.data.batch_size + (cfg.data.batch_size * cfg.data.unlabeled_batch_ratio if "unlabeled" in self.streams else 0)

    def evaluate(self, step: int) -> dict:
        checkpoint.sync_buffers([*self.raw.values(), *self.emas.values()], self.accelerator)
        eval_net = self.emas[self.method_cls.eval_role] if self.emas else self.raw[self.method_cls.eval_role]
        with torch.random.fork_rng(devices=[]):  # its DataLoader draws a seed: keep that out of the training RNG
            result = evaluate(eval_net, self.data.test, self.views["plain"], self.accelerator, self.cfg.data.eval_batch_size,
                              batches=self.test_batches)
            if self.accelerator.is_main_process:
                self._log_pseudo_label_grid(eval_net, step)
        confusion = result.pop("confusion")  # to TensorBoard, not into every checkpoint's history
        self.logger.scalars("eval", {"accuracy": result["accuracy"], "loss": result["loss"]}, step)
        if self.accelerator.is_main_process:
            self.logger.image("eval/confusion_matrix", confusion_figure(confusion, self.class_names), step)
        self.state["history"].append({"step": step, "epoch": step / self.cfg.train.steps_per_epoch, **result})
        return result

    @property
    def class_names(self) -> list[str]:
        return self.data.labeled.data.get("class_names") or [str(k) for k in range(self.data.labeled.num_classes)]

    def _log_pseudo_label_grid(self, net, step: int) -> None:
        """The evaluated network's pseudo-labels of the unlabeled pool's first samples (the same ones
        at every evaluation, read apart from the training streams) next to their hidden truth."""
        pool = self.data.unlabeled
        if pool is None or pool.kind != "image":
            return
        if self.grid_samples is None:
            self.grid_samples = first_samples(pool, GRID_SAMPLES, self.cfg.data.max_bad_fraction)
        images = self.grid_samples["inputs"]["plain"]
        classes, confidence = predict(net, self.views["plain"].batch(images), self.accelerator)
        self.logger.image("eval/unlabeled_pseudo_labels",
                          pseudo_label_figure(images, classes, confidence, self.grid_samples["truth"], self.class_names), step)

    def save(self, step: int, reason: str) -> Path:
        started = time.time()
        self.state["step"] = step
        self.state["wall_seconds"] = self.wall_before + started - self.session_start
        self.state["storage_retries"] = self._storage_retries()
        path = self.checkpointer.save(step, self.state, reason)
        self.logger.scalars("checkpoint", {"save_seconds": time.time() - started}, step)
        return path

    def _storage_retries(self) -> int:
        """Shard reads retried after a transient storage error (data/shards/tar.py) by every rank and
        its workers: those saved with the checkpoint resumed from, and this session's until now
        (a session killed between checkpoints loses its count since the last one)."""
        retried = torch.tensor([tar.retries_so_far() - self.retries_at_start], dtype=torch.float64, device=self.device)
        if self.world > 1:
            retried = self.accelerator.reduce(retried, "sum")
        return self.retries_before + int(retried.item())

    def finish(self, last_eval: dict, start_step: int) -> dict:
        cfg, data, total, accelerator = self.cfg, self.data, self.cfg.train.total_steps, self.accelerator
        session_seconds = time.time() - self.session_start
        corrupt = torch.tensor([s.corrupt_samples for s in self.streams.values()], dtype=torch.float64, device=self.device)
        if self.world > 1:
            corrupt = accelerator.reduce(corrupt, "sum")
        storage_retries = self._storage_retries()
        results = {
            "method": cfg.method.name,
            "dataset": data.source,
            "labels": data.labeled.num_samples,
            "labels_per_class": data.labeled.data.get("protocol", {}).get("labels_per_class"),
            "test_accuracy": last_eval["accuracy"],
            "test_loss": last_eval["loss"],
            "best_test_accuracy": max(h["accuracy"] for h in self.state["history"]),
            "evaluated_weights": "ema" if self.emas else "raw",
            "steps": total,
            "world_size": self.world,
            "launch": dict(launch_facts(self.accelerator), cpu_allocator=allocator_facts(self.retains_memory)),
            "wall_seconds": self.wall_before + session_seconds,
            "train_samples_per_second": (total - start_step) * self.samples_per_step / session_seconds if total > start_step else None,
            "data_wait_fraction": self.data_wait_seconds / session_seconds if total > start_step else None,
            "corrupt_samples": {name: int(n) for name, n in zip(self.streams, corrupt.tolist())},
            "storage_retries": storage_retries,
            "run_dir": str(self.run_dir),
        }
        if accelerator.is_main_process:
            checkpoint.atomic_write_text(self.run_dir / "results.json", json.dumps(results, indent=1))
            self.logger.line(f"{cfg.method.name}: test accuracy {results['test_accuracy']:.4f} ({self.run_dir / 'results.json'})")
        self.logger.hparams(run_settings(cfg), {"hparam/test_accuracy": results["test_accuracy"]}, total)
        self.logger.close()
        accelerator.wait_for_everyone()
        return results


class _StreamsPiece:
    """The run's training streams (labeled, unlabeled) as one piece of the rank file."""

    def __init__(self, streams: dict[str, TrainStream]):
        self.streams = streams

    def state_dict(self) -> dict:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def restore(self, own: dict | None, every_rank) -> None:
        for name, stream in self.streams.items():
            stream.restore(own[name] if own is not None else None, lambda name=name: [states[name] for states in every_rank()])


def train(cfg: Config) -> dict:
    """Train, resuming from the newest committed checkpoint of train.output_dir; then fine-tune on
    the labels when train.finetune.epochs > 0 (an ordinary run in output_dir/finetune). Holds the
    run lock of train.output_dir (from Python as from the command line)."""
    from dist_ssl.engine.lock import run_lock

    with run_lock(cfg.train.output_dir):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    trainer = Trainer(cfg)
    results = trainer.fit()
    if cfg.train.finetune.epochs > 0:
        tuned = _train(finetune_config(cfg, checkpoint.latest(trainer.run_dir / "checkpoints"), trainer.data.labeled.num_samples))
        results["finetuned"] = {k: tuned[k] for k in ("test_accuracy", "test_loss", "best_test_accuracy", "steps", "wall_seconds", "run_dir")}
        if trainer.accelerator.is_main_process:
            checkpoint.atomic_write_text(trainer.run_dir / "results.json", json.dumps(results, indent=1))
        trainer.accelerator.wait_for_everyone()
    return results
