"""Batch norm over the global batch (`train.sync_batchnorm`): a network with batch norm then trains the
same on any number of processes, as its data already is (data/consumers.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class _SumOverRanks(torch.autograd.Function):
    """all_reduce (sum) whose backward sums the gradients over the ranks. Why our own: torch's
    `torch.distributed.nn.functional.all_reduce` is deprecated (a warning at every call) in favour of a
    private module."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics are those of the global batch, on any backend.

    Why not torch's SyncBatchNorm everywhere: its kernels (`batch_norm_stats` and the rest) exist for
    GPUs only, and it refuses CPU tensors; on GPUs `convert` uses it. Here each rank's per-channel
    count, sum and sum of squares (in float64: no cancellation) are summed over the ranks with an
    all_reduce that autograd differentiates (its backward sums the gradients over the ranks, as
    SyncBatchNorm's does), so the gradients are those of batch norm over the global batch. On one
    process, and in eval mode, it is plain batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions, got {input.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        channels, count = x.size(1), x.numel() // max(x.size(1), 1)
        dims = [0, *range(2, x.dim())]
        values = x.float()  # statistics and normalization in float32 (as torch's kernels do under autocast)
        if count:
            var, mean = torch.var_mean(values, dim=dims, correction=0)
            mean = mean.double()
            local = torch.cat([mean * count, (var.double() + mean * mean) * count, mean.new_full((1,), count)])
        else:  # a rank without samples still joins the reduction
            local = x.new_zeros(2 * channels + 1, dtype=torch.float64)
        total = _SumOverRanks.apply(local)
        samples = total[-1]
        mean = total[:channels] / samples
        var = (total[channels : 2 * channels] / samples - mean * mean).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * samples / (samples - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        scale = torch.rsqrt(var + self.eps).float()
        shift = -mean.float() * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = [1, channels] + [1] * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), values, scale.view(shape)).to(x.dtype)


def convert(net: nn.Module, device: torch.device) -> nn.Module:
    """`net` with every batch norm layer normalizing over the global batch: torch's SyncBatchNorm on
    GPUs, GlobalBatchNorm elsewhere. The same parameter and buffer objects: optimizers built on them
    stay valid, and checkpoints have the same keys either way."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(net)
    return _convert(net)


def _convert(module: nn.Module) -> nn.Module:
    converted = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _convert(child))
    return converted
