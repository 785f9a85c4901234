"""One typed config tree for every run (the methods' sections: `config/methods.py`).

Precedence: dataclass defaults < YAML file < `key=value` overrides on the command line.
Unknown keys are an error that names the closest valid key; ill-typed values name the key and the
type it expects. The resolved tree is written as `config.yaml` into every run folder.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dist_ssl.config.methods import (  # noqa: F401  (the method sections: part of the tree, importable from here)
    FixMatchConfig,
    FlexMatchConfig,
    FreeMatchConfig,
    MPLConfig,
    PseudoLabelConfig,
    SMPLConfig,
    SoftMatchConfig,
)
from dist_ssl.errors import UserError, check_config


@dataclass
class AugmentConfig:
    """Views of an image: `weak` = shift (+flip), `strong` = weak + RandAugment + cutout."""

    crop_padding: float = 0.125  # random-shift padding as a fraction of the image side (4 px at 32 px)
    flip: bool = False  # horizontal flips: right for CIFAR/STL, wrong for digits
    randaugment_ops: int = 2
    randaugment_magnitude: int = 10  # of torchvision's 31 bins
    cutout: float = 0.5  # side of the erased square as a fraction of the image side; 0 = off
    # Vector data (two moons, embeddings): the strong view adds Gaussian noise of this many standard
    # deviations of each feature; 0 = every view is the point itself (seed 002's toy protocol).
    vector_noise: float = 0.0
    # Where views are computed: `per_sample` = torchvision v2 one sample at a time in the DataLoader
    # workers (the reference); `batched` = the workers only draw each sample's parameters and the
    # training device applies them to the whole batch (data/device_views.py: the same views, bit for
    # bit); `auto` = batched, measured faster on CPU and GPU (docs/speed.md).
    path: Literal["auto", "per_sample", "batched"] = "auto"

    def __post_init__(self):
        check_config(0 <= self.crop_padding <= 0.5, "data.augment.crop_padding", "must be in [0, 0.5]")
        check_config(0 <= self.randaugment_magnitude <= 30, "data.augment.randaugment_magnitude", "must be in [0, 30]")
        check_config(0 <= self.cutout < 1, "data.augment.cutout", "must be in [0, 1)")
        check_config(self.vector_noise >= 0, "data.augment.vector_noise", "must be >= 0")


@dataclass
class DataConfig:
    shards: str = ""  # dataset folder written by `dist-ssl shards write`
    labeled: str = "labeled"  # split folders, relative to `shards` unless absolute
    unlabeled: str = "unlabeled"
    test: str = "test"
    batch_size: int = 64  # labeled samples per step, all ranks together (split evenly over ranks)
    unlabeled_batch_ratio: int = 7  # mu: unlabeled samples per labeled sample
    eval_batch_size: int = 256  # per rank
    workers: int = 1  # DataLoader worker processes per rank and stream (0 = in the training process)
    shuffle_buffer: int = 2000  # samples; a shard smaller than this is fully permuted
    seed: int = 0  # drives shard order, shuffling and per-sample augmentation
    max_bad_fraction: float = 0.01  # corrupt samples are skipped; a reader fails past this fraction (0 = fail on the first)
    # Readers the training streams are planned for, whatever the processes and workers (data/consumers.py):
    # global batches are the same on any number of processes that divides gcd(virtual_consumers, batch).
    virtual_consumers: int = 64
    # Shard URLs in the manifests that run a command (pipe:) or lie outside their split folder are
    # refused unless true: a dataset folder from someone else must not run anything.
    allow_pipe: bool = False
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        check_config(self.batch_size > 0, "data.batch_size", "must be positive")
        check_config(self.unlabeled_batch_ratio >= 0, "data.unlabeled_batch_ratio", "must be >= 0")
        check_config(self.eval_batch_size > 0, "data.eval_batch_size", "must be positive")
        check_config(self.workers >= 0, "data.workers", "must be >= 0")
        check_config(self.shuffle_buffer >= 1, "data.shuffle_buffer", "must be >= 1")
        check_config(0 <= self.max_bad_fraction < 1, "data.max_bad_fraction", "must be in [0, 1)")
        check_config(self.virtual_consumers > 0, "data.virtual_consumers", "must be positive")


@dataclass
class ModelConfig:
    name: str = "small_cnn"  # see dist_ssl.models.MODELS
    hidden_sizes: list[int] = field(default_factory=lambda: [8, 8])  # mlp only
    dropout: float = 0.0  # before the classifier
    bn_momentum: float = 0.1  # PyTorch convention (MPL uses 0.001)
    # torchvision ResNet/DenseNet: `small` = 3x3 stride-1 first convolution and no max-pool (CIFAR-size
    # images keep their resolution), `imagenet` = the 7x7 stride-2 stem; `auto` = small up to 64 px.
    stem: Literal["auto", "small", "imagenet"] = "auto"

    def __post_init__(self):
        check_config(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        check_config(0 < self.bn_momentum <= 1, "model.bn_momentum", "must be in (0, 1]")


@dataclass
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.03
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to biases and normalization weights
    schedule: Literal["cosine", "cosine_7_16", "constant"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 0.0  # max global grad norm; 0 = off

    def __post_init__(self):
        check_config(self.lr > 0, "optim.lr", "must be positive")
        check_config(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        check_config(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        check_config(self.grad_clip >= 0, "optim.grad_clip", "must be >= 0")


@dataclass
class MethodConfig:
    name: str = "fixmatch"  # see dist_ssl.methods.METHODS
    # FixMatch, FlexMatch, FreeMatch, SoftMatch: one forward over [labeled, weak, strong] (the papers');
    # false: the weak view in a pass of its own without gradients, a faster step (methods/base.py)
    concat_forward: bool = True
    pseudo_label: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    fixmatch: FixMatchConfig = field(default_factory=FixMatchConfig)
    mpl: MPLConfig = field(default_factory=MPLConfig)
    smpl: SMPLConfig = field(default_factory=SMPLConfig)
    freematch: FreeMatchConfig = field(default_factory=FreeMatchConfig)
    softmatch: SoftMatchConfig = field(default_factory=SoftMatchConfig)
    flexmatch: FlexMatchConfig = field(default_factory=FlexMatchConfig)


@dataclass
class RoleConfig:
    """One network of a method that trains several (MPL's teacher and student). A key left null takes
    the shared `model.*` / `optim.*` value, so a role nobody mentions trains like the others."""

    model: str | None = None  # model.name
    dropout: float | None = None
    lr: float | None = None
    weight_decay: float | None = None
    warmup_steps: int | None = None
    grad_clip: float | None = None
    wait_steps: int = 0  # the network does not train before this step; its schedule spans the steps after

    def __post_init__(self):
        check_config(self.dropout is None or 0 <= self.dropout < 1, "roles.*.dropout", "must be in [0, 1)")
        check_config(self.lr is None or self.lr > 0, "roles.*.lr", "must be positive")
        check_config(self.weight_decay is None or self.weight_decay >= 0, "roles.*.weight_decay", "must be >= 0")
        check_config(self.warmup_steps is None or self.warmup_steps >= 0, "roles.*.warmup_steps", "must be >= 0")
        check_config(self.grad_clip is None or self.grad_clip >= 0, "roles.*.grad_clip", "must be >= 0")
        check_config(self.wait_steps >= 0, "roles.*.wait_steps", "must be >= 0")


@dataclass
class RolesConfig:
    teacher: RoleConfig = field(default_factory=RoleConfig)
    student: RoleConfig = field(default_factory=RoleConfig)


@dataclass
class FinetuneConfig:
    """After training, fine-tune the evaluated network (its EMA when on) on the labels alone, without
    dropout, as a supervised run in `output_dir/finetune` (MPL's last stage). 0 epochs = off."""

    epochs: int = 0
    steps_per_epoch: int = 0  # 0 = one pass over the labeled split
    batch_size: int = 512  # global, like data.batch_size
    lr: float = 3e-5
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0

    def __post_init__(self):
        check_config(self.epochs >= 0, "train.finetune.epochs", "must be >= 0")
        check_config(self.steps_per_epoch >= 0, "train.finetune.steps_per_epoch", "must be >= 0")
        check_config(self.batch_size > 0, "train.finetune.batch_size", "must be positive")
        check_config(self.lr > 0, "train.finetune.lr", "must be positive")
        check_config(self.weight_decay >= 0, "train.finetune.weight_decay", "must be >= 0")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    epochs: int = 10
    steps_per_epoch: int = 100
    eval_every_epochs: int = 1
    checkpoint_every_epochs: int = 1  # 0 = only at the end, on signals and the intervals below
    checkpoint_every_steps: int = 0  # 0 = off; bounds the work a hard kill can lose on long epochs
    checkpoint_every_minutes: float = 0.0  # 0 = off; wall clock, the ranks agree at a step boundary
    keep_last: int = 2  # committed checkpoints kept; the newest is never removed
    resume: str = "auto"  # auto (newest committed checkpoint) | never | path of a step-N folder
    ema_decay: float = 0.0  # EMA of the evaluated network (MPL: the student); 0 = off; evaluation uses it
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    channels_last: bool = False  # NHWC networks and inputs: on in the CIFAR FixMatch configs (docs/speed.md)
    compile: bool = False  # torch.compile the networks (minutes of compilation before the first step)
    # Batch norm statistics over the global batch (torch's SyncBatchNorm on GPUs, GlobalBatchNorm over
    # gloo on CPUs: engine/sync_batchnorm.py): with it, a network with batch norm trains the same on
    # any number of processes.
    sync_batchnorm: bool = False
    # CPU training: `retain` keeps freed memory in the heap instead of returning it to the kernel
    # every step: faster, at 1.2-1.3x the peak memory; `default` leaves glibc as the command started
    # it (with huge pages: engine/allocator.py).
    cpu_allocator: Literal["default", "retain"] = "default"
    log_every_steps: int = 10
    seed: int = 0  # model init and per-rank dropout
    # A checkpoint (step-N or run folder) whose evaluated network (its EMA when saved) starts every
    # network of this run, e.g. fine-tuning a pretrained student. Ignored when the run resumes.
    init_from: str = ""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def __post_init__(self):
        check_config(self.epochs > 0, "train.epochs", "must be positive")
        check_config(self.steps_per_epoch > 0, "train.steps_per_epoch", "must be positive")
        check_config(self.eval_every_epochs > 0, "train.eval_every_epochs", "must be positive")
        check_config(self.checkpoint_every_epochs >= 0, "train.checkpoint_every_epochs", "must be >= 0 (0 = off)")
        check_config(self.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", "must be >= 0 (0 = off)")
        check_config(self.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes", "must be >= 0 (0 = off)")
        check_config(self.keep_last >= 1, "train.keep_last", "must be >= 1")
        check_config(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        check_config(self.log_every_steps > 0, "train.log_every_steps", "must be positive")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)


def _role(cfg: Config, role: str) -> RoleConfig:
    return getattr(cfg.roles, role, None) or RoleConfig()


def role_model(cfg: Config, role: str) -> ModelConfig:
    """The model settings of network `role`: the shared `model` section with the role's overrides."""
    over = _role(cfg, role)
    changes = {k: v for k, v in (("name", over.model), ("dropout", over.dropout)) if v is not None}
    return dataclasses.replace(cfg.model, **changes)


def role_optim(cfg: Config, role: str) -> OptimConfig:
    """The optimizer settings of network `role`: the shared `optim` section with the role's overrides."""
    over = _role(cfg, role)
    keys = ("lr", "weight_decay", "warmup_steps", "grad_clip")
    return dataclasses.replace(cfg.optim, **{k: getattr(over, k) for k in keys if getattr(over, k) is not None})


def role_wait_steps(cfg: Config, role: str) -> int:
    return _role(cfg, role).wait_steps


# ----------------------------------------------------------------------------------------------
# pseudo-labeling, selection and the teacher -> student pipeline


@dataclass
class InferenceConfig:
    """`dist-ssl pseudo-label`: a checkpoint predicts every sample of a pool exactly once."""

    top_p: int = 10  # classes kept per sample, with their probabilities (billion-scale: P = 10)
    batch_size: int = 256  # per process
    workers: int = 2  # decoding processes per rank
    weights: Literal["auto", "ema", "raw"] = "auto"  # auto: the EMA when the checkpoint has one
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs (fp16 without bf16), fp32 on CPU
    max_bad_fraction: float = 0.01  # corrupt samples are skipped (and listed); a reader fails past this fraction
    allow_pipe: bool = False  # the pool's manifest may name pipe: URLs / shards outside its folder (see data.allow_pipe)

    def __post_init__(self):
        check_config(self.top_p >= 1, "pseudo_label.top_p", "must be >= 1")
        check_config(0 <= self.max_bad_fraction < 1, "pseudo_label.max_bad_fraction", "must be in [0, 1)")
        check_config(self.batch_size >= 1, "pseudo_label.batch_size", "must be >= 1")
        check_config(self.workers >= 0, "pseudo_label.workers", "must be >= 0")


@dataclass
class SelectConfig:
    """Which pseudo-labeled samples become training data, and with which targets."""

    # top_k: per class, the K samples with the highest probability of that class among their top-P
    #   (billion-scale; a sample may be picked for more than one class);
    # threshold: samples whose top-1 probability is >= threshold; all: every sample (top-1 label);
    # sample_rate: the most confident sample_rate fraction of each predicted class (seed 001); in
    #   pipeline round r the fraction is r * sample_rate, so the set grows every round.
    policy: Literal["top_k", "threshold", "sample_rate", "all"] = "top_k"
    top_k: int = 16000  # K (16k per class on ImageNet in the paper)
    threshold: float = 0.95
    sample_rate: float = 0.1
    soft: bool = False  # keep the (top-P) class probabilities as the training target, not only the label
    include_labeled: bool = False  # pipeline: also copy the labeled split in (self-training rounds)
    maxcount: int = 10000  # samples per written shard

    def __post_init__(self):
        check_config(self.top_k >= 1, "select.top_k", "must be >= 1")
        check_config(0 <= self.threshold <= 1, "select.threshold", "must be in [0, 1]")
        check_config(0 < self.sample_rate <= 1, "select.sample_rate", "must be in (0, 1]")
        check_config(self.maxcount >= 1, "select.maxcount", "must be >= 1")


@dataclass
class PipelineConfig:
    """`dist-ssl pipeline`: teacher on the labels -> pseudo-label the pool -> select -> pretrain the
    student on the selection -> fine-tune it on the labels; `rounds` > 1 repeats it with each round's
    final model as the next teacher. Each stage is an ordinary run in its own folder under
    `output_dir`; the pipeline sets the stages' `train.output_dir`, `data.shards`, the student's
    `data.labeled` and the fine-tune's `train.init_from`."""

    output_dir: str = "runs/pipeline"
    shards: str = ""  # dataset folder written by `dist-ssl shards write`
    rounds: int = 1
    finetune_on_labels: bool = True  # stage 5; off for plain self-training rounds (seeds 000, 001)
    allow_pipe: bool = False  # every stage may open pipe: URLs / shards outside their folders (see data.allow_pipe)
    teacher: Config = field(default_factory=Config)
    pseudo_label: InferenceConfig = field(default_factory=InferenceConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    student: Config = field(default_factory=Config)
    finetune: Config = field(default_factory=Config)

    def __post_init__(self):
        check_config(self.rounds >= 1, "rounds", "must be >= 1")
        stages = {"teacher": self.teacher, "student": self.student, "finetune": self.finetune}
        for name, stage in stages.items():
            check_config(stage.train.output_dir == TrainConfig.output_dir, f"{name}.train.output_dir",
                   "is set by the pipeline (stage folders live under output_dir); remove it")
            check_config(stage.data.shards in ("", self.shards), f"{name}.data.shards", "is set by the pipeline from 'shards'; remove it")
            check_config(not stage.train.init_from, f"{name}.train.init_from", "is set by the pipeline; remove it")
        check_config(self.student.data.labeled == DataConfig.labeled, "student.data.labeled",
               "is set by the pipeline (the selected pseudo-labels); remove it")
        precisions = {stage.train.mixed_precision for stage in stages.values()}
        check_config(len(precisions) == 1, "student.train.mixed_precision",
               f"must equal the teacher's and finetune's (accelerate fixes it once per process); got {sorted(precisions)}")


# ----------------------------------------------------------------------------------------------
# loading


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the tree, e.g. 'train.epochs'."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(valid_keys(hints[f.name], name + "."))
        else:
            keys.append(name)
    return keys


def _unknown_key(key: str, prefix: str, root: type = Config) -> UserError:
    everything = valid_keys(root)
    candidates = difflib.get_close_matches(prefix + key, everything, n=1, cutoff=0.5)
    if not candidates:  # a misspelt section: compare the last part with every leaf's last part
        tail = {k.rsplit(".", 1)[-1]: k for k in everything}
        near = difflib.get_close_matches(key, list(tail), n=1, cutoff=0.6)
        candidates = [tail[near[0]]] if near else []
    hint = f" (did you mean '{candidates[0]}'?)" if candidates else ""
    return UserError(f"unknown config key '{prefix}{key}'{hint}")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's type, or fail naming the key.

    Why not pydantic or OmegaConf: this and `_build` are ~90 lines over the stdlib dataclasses that
    every room already imports, and give the errors we promise (the dotted key, its closest valid
    key, one line) with no dependency the GPU images would have to carry (they install --no-deps)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], key)
    if origin is list:
        (item,) = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            value = yaml.safe_load(text) if text.startswith("[") else [v for v in text.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"config key '{key}' expects a list; got {value!r}")
        return [_coerce(v, item, key) for v in value]
    try:
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            raise ValueError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise UserError(f"config key '{key}' expects {tp.__name__}; got {value!r}") from None
    raise TypeError(f"unsupported config field type {tp!r} for {key}")


def _build(cls: type, data: dict, prefix: str = "", root: type = Config) -> Any:
    if not isinstance(data, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping; got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(str(key), prefix, root)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            section = prefix + f.name + "."
            try:
                kwargs[f.name] = _build(tp, data[f.name] if data[f.name] is not None else {}, section, root)
            except UserError as exc:
                raise _within(exc, section) if tp is Config else exc from None
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, prefix + f.name)
    return cls(**kwargs)


def _within(exc: UserError, section: str) -> UserError:
    """A check of a Config nested in a bigger tree (a pipeline stage) names its key from the top."""
    head = "config key '"
    message = str(exc)
    if message.startswith(head) and not message.startswith(head + section):
        return UserError(head + section + message[len(head):])
    return exc


def _set_dotted(tree: dict, dotted: str, value: Any, root: type = Config) -> None:
    parts = dotted.split(".")
    node = tree
    cls: type = root
    for i, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise _unknown_key(".".join(parts[i:]), ".".join(parts[:i]) + "." if i else "", root)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(hints[part]):
                raise UserError(f"config key '{dotted}' is a section; set one of its keys, e.g. '{valid_keys(hints[part], dotted + '.')[0]}=...'")
            node[part] = value
        else:
            if not dataclasses.is_dataclass(hints[part]):
                raise UserError(f"config key '{'.'.join(parts[: i + 1])}' has no sub-keys")
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
            cls = hints[part]


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """defaults < YAML at `path` < `key=value` overrides."""
    return _load(Config, path, overrides)


def load_pipeline_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """The same precedence for a pipeline, e.g. the override `student.model.name=mlp`."""
    return _load(PipelineConfig, path, overrides)


def _load(root: type, path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> Any:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"config file {path} must hold a mapping of sections, not {type(loaded).__name__}")
        tree = loaded or {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override '{item}' is not of the form key=value")
        _set_dotted(tree, key.strip(), value, root)
    return _build(root, tree, root=root)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    return _build(Config, data)


def save_config(cfg: Config, path: str | Path) -> None:
    from dist_ssl.files import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))
