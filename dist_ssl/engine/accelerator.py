"""Creating the Accelerator the same way for training, evaluation and inference, and preparing the
networks and optimizers of a training run for it (DDP, or one DeepSpeed engine)."""

from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

from dist_ssl.errors import UserError

T = TypeVar("T")


def _on_cpu() -> bool:
    cpu = not torch.cuda.is_available()
    if cpu:  # accelerate imports DeepSpeed when installed; spare its "no GPU detected" warning on CPU
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return cpu


def deepspeed_requested() -> bool:
    """`accelerate launch` exports this for a `distributed_type: DEEPSPEED` config or --use_deepspeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("1", "true", "yes")


def _check_deepspeed_installed() -> None:
    # accelerate's DeepSpeed plugin also imports transformers' version check, unguarded.
    for package in ("deepspeed", "transformers"):
        try:
            __import__(package)
        except ImportError as exc:
            raise UserError(
                f"the launch asks for DeepSpeed, but {package} cannot be imported ({exc}): pip install 'dist-ssl[deepspeed]'"
            ) from None


# Checked against DDP on CPU (deepspeed 0.19.8): stage 2 gives the same losses and weights, to the
# bit, on 1 and 2 processes. Why the others are refused:
SUPPORTED_ZERO_STAGE = 2
UNSUPPORTED_ZERO_STAGES = {
    1: "its second update differed from DDP's on digits fixmatch, unexplained",
    3: "it partitions the weights themselves, which evaluation, the EMA and checkpoints read whole",
}


def make_accelerator(mixed_precision: str = "no"):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    cpu = _on_cpu()
    if cpu and mixed_precision == "fp16":
        raise UserError("mixed precision fp16 needs a GPU; use bf16 or no on CPU")
    if not deepspeed_requested():
        # accelerate only forms a gloo group over CPU processes when told it runs on CPU.
        return Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    _check_deepspeed_installed()
    # cpu=True would make accelerate drop the DeepSpeed plugin and run plain MULTI_CPU without a
    # word; without it DeepSpeed runs on its own CPU accelerator (DS_ACCELERATOR=cpu, set above).
    # On CPU accelerate names no backend, and without one it leaves every rank in a group of one:
    # gloo joins them (DeepSpeed's CPU accelerator falls back to gloo when oneCCL is absent, too).
    from accelerate.utils import InitProcessGroupKwargs

    accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if cpu else None)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        raise UserError(f"the launch asks for DeepSpeed, but accelerate set up {accelerator.distributed_type.value}")
    stage = accelerator.state.deepspeed_plugin.zero_stage
    if stage != SUPPORTED_ZERO_STAGE:
        raise UserError(
            f"ZeRO stage {stage} is not supported, only stage {SUPPORTED_ZERO_STAGE} "
            f"({UNSUPPORTED_ZERO_STAGES.get(stage, 'not checked')}): use launch/accelerate/deepspeed_zero2.yaml"
        )
    if accelerator.num_processes != launched:
        # Every rank would train alone on its share of the batch: not the run that was asked for.
        raise UserError(
            f"the launch started {launched} processes, but DeepSpeed formed a group of {accelerator.num_processes} "
            f"on {accelerator.device.type}"
        )
    return accelerator


def prepare_training(accelerator, nets: dict, optimizers: dict, specs: dict, micro_batch: int) -> None:
    """Wrap networks and optimizers in place: DDP (and accelerate's optimizer wrapper) each on its
    own, or, under DeepSpeed, the one network and its optimizer together as one engine. DeepSpeed
    clips inside its step and `accelerator.clip_grad_norm_` only reads the norm there, so the
    config's clip goes into the engine's config; accelerate would otherwise fill in 1.0."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        for role in nets:
            nets[role] = accelerator.prepare(nets[role])
        for name in optimizers:
            optimizers[name] = accelerator.prepare(optimizers[name])
        return
    (name, spec), = specs.items()  # loop.check_deepspeed refused several optimizers before
    if set(nets) != {spec.net}:
        raise UserError(f"DeepSpeed runs one network per engine; this method builds {', '.join(nets)}")
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch  # accelerate derives train_batch_size from it
    config["gradient_clipping"] = float(spec.optim.grad_clip)
    plain = optimizers[name]
    params = [p for group in plain.param_groups for p in group["params"]]
    restored = plain.state_dict()  # a resumed run's state, loaded before prepare
    nets[spec.net], wrapped = accelerator.prepare(nets[spec.net], plain)
    optimizers[name] = ZeroOptimizer(wrapped, params)
    if restored["state"]:
        optimizers[name].load_state_dict(restored)


class ZeroOptimizer:
    """accelerate's DeepSpeed optimizer, whose state reads and writes as the plain torch optimizer's
    (full per-parameter tensors, parameters by index). A DeepSpeed checkpoint thus holds what a DDP
    one holds and loads with weights_only: it resumes under DeepSpeed or DDP, on any number of
    processes. (DeepSpeed's own state_dict is per rank, partitioned and pickles its loss scaler.)

    ZeRO stages 1 and 2 keep each parameter group of the torch optimizer as one flat fp32 partition
    per rank; DeepSpeed's fragment API maps a parameter to its slice of it."""

    def __init__(self, wrapped, params: list):
        self.wrapped = wrapped  # accelerate's DeepSpeedOptimizerWrapper: step/zero_grad are the engine's
        self.zero = wrapped.optimizer  # DeepSpeed's ZeRO optimizer
        self.optimizer = self.zero.optimizer  # the torch optimizer it steps (its type names the checkpoint's)
        self.params = params

    def step(self):
        self.wrapped.step()

    def zero_grad(self, set_to_none: bool = True):
        self.wrapped.zero_grad(set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _groups(self):
        """(flat fp32 partition, its parameters, data-parallel group) per group: DeepSpeed's bit16
        groups follow the torch optimizer's."""
        return list(zip((g["params"][0] for g in self.optimizer.param_groups), self.zero.bit16_groups, self.zero.real_dp_process_group))

    def state_dict(self) -> dict:
        # DeepSpeed's safe_get_full_optimizer_state is not used: it links the fragments of every group
        # after the first group's first step, so with two groups (decay / no decay) the second one's
        # state is missing there.
        from deepspeed import comm

        index = {id(p): i for i, p in enumerate(self.params)}
        groups = [dict({k: v for k, v in g.items() if k != "params"}, params=[index[id(p)] for p in members])
                  for g, (_, members, _) in zip(self.optimizer.param_groups, self._groups())]
        state = {}
        for flat, members, dp_group in self._groups():
            flat_state = self.optimizer.state.get(flat, {})
            for key, value in sorted(flat_state.items()):  # the same order on every rank: collectives below
                if not (torch.is_tensor(value) and value.shape == flat.shape):  # e.g. AdamW's step, one per group
                    for p in members:
                        state.setdefault(index[id(p)], {})[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
                    continue
                for p in members:
                    full = torch.zeros(p.numel(), dtype=flat.dtype, device=flat.device)
                    mapping = p._hp_mapping  # None when the parameter lies wholly in other ranks' partitions
                    if mapping is not None:
                        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                        full.narrow(0, lp.start, lp.numel).copy_(value.narrow(0, hp.start, hp.numel))
                    comm.all_reduce(full, group=dp_group)  # each element lies in exactly one rank's partition
                    state.setdefault(index[id(p)], {})[key] = full.view_as(p).cpu()
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, saved: dict) -> None:
        index = {id(p): i for i, p in enumerate(self.params)}
        for group, saved_group in zip(self.optimizer.param_groups, saved["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
        for flat, members, _ in self._groups():
            entries = {}
            for p in members:
                mapping = p._hp_mapping
                for key, value in saved["state"].get(index[id(p)], {}).items():
                    if not (torch.is_tensor(value) and value.shape == p.shape):
                        entries[key] = value.clone() if torch.is_tensor(value) else value
                        continue
                    buffer = entries.setdefault(key, torch.zeros_like(flat))
                    if mapping is not None:
                        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                        buffer.narrow(0, hp.start, hp.numel).copy_(value.to(flat).flatten().narrow(0, lp.start, lp.numel))
            if entries:
                self.optimizer.state[flat] = entries


def launch_facts(accelerator) -> dict:
    """How accelerate ran the job, for results.json: a DeepSpeed launch that fell back to something
    else shows here."""
    plugin = accelerator.state.deepspeed_plugin
    return {
        "distributed_type": accelerator.distributed_type.value,
        "backend": accelerator.state.backend,
        "device": accelerator.device.type,
        "mixed_precision": accelerator.mixed_precision,
        "zero_stage": plugin.zero_stage if plugin is not None else None,
    }


def process_state():
    """accelerate's process control alone (rank, world, device, barriers), for work that trains
    nothing. Unlike an Accelerator it fixes no mixed-precision setting, so a pipeline can run it
    between training stages whatever their `train.mixed_precision`."""
    from accelerate import PartialState

    return PartialState(cpu=_on_cpu())


def on_main(state, decide: Callable[[], T]) -> T:
    """`decide()` on rank 0 only; every rank returns its result, or raises the error it raised."""
    outcome: list = [None]
    failure = None
    if state.is_main_process:
        try:
            outcome = [("ok", decide())]
        except UserError as exc:
            outcome = [("error", str(exc))]
        except BaseException as exc:  # a bug on rank 0: the others must not wait for it forever
            outcome = [("crash", f"rank 0 failed with {type(exc).__name__}: {exc}")]
            failure = exc
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome, from_process=0)
    if failure is not None:
        raise failure
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    if kind == "crash":
        raise RuntimeError(value)
    return value
