"""Multi-GPU through PyTorch's own engine: `torchrun --nproc_per_node=K main.py ...` sets the
environment; we init the process group (NCCL on GPUs, gloo on CPU) and wrap models in DDP."""
import datetime
import os
import sys

import torch
import torch.distributed as torch_dist

from errors import UserError


def _env_int(name, default):
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"the environment variable {name}={value!r} is not a whole number (torchrun sets it; "
                        f"unset it to run one process)") from None


def world_size():
    return _env_int("WORLD_SIZE", 1)


def rank():
    return _env_int("RANK", 0)


def local_rank():
    return _env_int("LOCAL_RANK", 0)


def check_environment():
    """torchrun's variables, left over in a shell or set by hand, must describe one process of a
    group torchrun started: refused here, before any work, rather than failing (or waiting for
    peers that never come) later."""
    n, r = world_size(), rank()
    if n < 1 or not 0 <= r < n or (n > 1 and "RANK" not in os.environ):
        raise UserError(f"RANK={os.environ.get('RANK')} and WORLD_SIZE={os.environ.get('WORLD_SIZE')} do not "
                        f"describe a process of a group: start several with torchrun --nproc_per_node=K, or unset "
                        f"them to run one")
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if n > 1 and name not in os.environ]
    if missing:
        raise UserError(f"WORLD_SIZE={n} without {' and '.join(missing)}: start several processes with torchrun "
                        f"--nproc_per_node={n}, which sets them, or unset WORLD_SIZE to run one")


def is_main():
    return rank() == 0


def enabled():
    return world_size() > 1


def setup(device):
    """Join the process group torchrun prepared (a no-op for a single process)."""
    check_environment()
    if not enabled() or torch_dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if is_main():  # if a process never comes (variables set by hand), this is the last line
        print(f"joining a group of {world_size()} processes ({backend}, {os.environ['MASTER_ADDR']}:"
              f"{os.environ['MASTER_PORT']})", file=sys.stderr)
    torch_dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))


def teardown(finished=True):
    """Leave the process group. After a normal finish every rank first waits for the others: gloo
    could abort a rank at exit ("terminate called without an active exception") when its peer
    tore down while its last collective was still in flight. After an error there is no barrier,
    since the other ranks may never reach it."""
    if not torch_dist.is_initialized():
        return
    if finished:
        torch_dist.barrier()
    torch_dist.destroy_process_group()


def wrap(model, device):
    if not enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def unwrap(model):
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)      # DDP


def per_rank_batch_size(batch_size):
    """Each process's share of the global batch; the global batch stays what was asked for, so a
    run's learning rate means the same on any number of GPUs."""
    if batch_size % world_size():
        raise UserError(f"--batch_size {batch_size} does not split evenly over {world_size()} processes; "
                        f"use a multiple of {world_size()}")
    return batch_size // world_size()


def barrier():
    if torch_dist.is_initialized():
        torch_dist.barrier()


def mean_across_ranks(value):
    if not torch_dist.is_initialized():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.all_reduce(t)
    return float(t.item()) / world_size()


def sum_across_ranks(t):
    """A tensor summed over every rank (the sum on every rank), on its device: no host sync."""
    if torch_dist.is_initialized():
        t = t.clone()
        torch_dist.all_reduce(t)
    return t


def any_across_ranks(flag):
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    if not torch_dist.is_initialized():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if torch_dist.get_backend() == "nccl":
        t = t.cuda()
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item())


def all_across_ranks(flag):
    """A boolean tensor, true on every rank only where it is true on all, without a host sync
    (the caller's own sync reads it)."""
    if not torch_dist.is_initialized():
        return flag
    t = flag.to(torch.int32)
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return t.bool()


def gather_objects(obj):
    """Every rank's `obj` (picklable), as a list in rank order, on every rank."""
    if not torch_dist.is_initialized():
        return [obj]
    objects = [None] * world_size()
    torch_dist.all_gather_object(objects, obj)
    return objects


def gather_tensor(t):
    """Concatenate a tensor from every rank along dim 0 (same shape on every rank)."""
    if not torch_dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    torch_dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)
