"""GlobalBatchNorm (train.sync_batchnorm on CPUs): two gloo processes holding the two halves of a batch
get what one process gets from plain batch norm over the whole batch: outputs, gradients of the
inputs and of the affine parameters (summed as DDP's average of the ranks' mean losses), running
statistics."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_ssl.engine.sync_batchnorm import GlobalBatchNorm, convert

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def batch():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 5, 5, generator=generator) * 3 + 2
    target = torch.randn(12, 3, 5, 5, generator=generator)
    return x, target


def reference():
    x, target = batch()
    x.requires_grad_(True)
    bn = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    out = bn(x)
    ((out - target) ** 2).mean().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def rank_main(rank, store, results):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        x, target = batch()
        x, target = x[rank * 6 : rank * 6 + 6].clone().requires_grad_(True), target[rank * 6 : rank * 6 + 6]
        net = convert(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3)), torch.device("cpu"))
        bn = net[0]
        assert isinstance(bn, GlobalBatchNorm)
        with torch.no_grad():
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        out = net(x)
        ((out - target) ** 2).mean().backward()
        for grad in (bn.weight.grad, bn.bias.grad):  # what DDP does: the average over the ranks
            dist.all_reduce(grad)
            grad /= 2
        results[rank] = [t.detach().clone() for t in (out, x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)]
    finally:
        dist.destroy_process_group()


def test_two_processes_normalize_over_the_global_batch(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(rank_main, args=(str(tmp_path / "store"), results), nprocs=2)
    out, x_grad, weight_grad, bias_grad, running_mean, running_var = reference()
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out, **TOLERANCE)
    # the loss of each rank is the mean over its half: twice the gradient of the global mean, per sample
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]) / 2, x_grad, **TOLERANCE)
    for rank in (0, 1):
        torch.testing.assert_close(results[rank][2], weight_grad, **TOLERANCE)
        torch.testing.assert_close(results[rank][3], bias_grad, **TOLERANCE)
        torch.testing.assert_close(results[rank][4], running_mean, **TOLERANCE)
        torch.testing.assert_close(results[rank][5], running_var, **TOLERANCE)


def test_convert_keeps_the_parameter_objects_and_state_dict_keys():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(2)))
    params, keys = list(net.parameters()), list(net.state_dict())
    converted = convert(net, torch.device("cpu"))
    assert [type(m) for m in converted.modules()].count(GlobalBatchNorm) == 2
    assert all(a is b for a, b in zip(converted.parameters(), params, strict=True))
    assert list(converted.state_dict()) == keys
    x = torch.randn(4, 1, 5, 5)
    converted.eval()
    net_ref = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    net_ref.load_state_dict({k: v for k, v in converted.state_dict().items() if not k.startswith("2.")})
    torch.testing.assert_close(converted[:2](x), net_ref.eval()(x))  # one process / eval: plain batch norm
