"""Training across several processes with FSDP2: `torchrun --nproc-per-node N swat_min.py train`
(or `run`).

Every process holds a shard of each block's weights (torch.distributed.fsdp.fully_shard, one call
per block, then the root); a block's weights are gathered for its forward and backward and its
gradients reduce-scattered back into shards. The trainer itself changes in four places only:
- each process takes its share of every micro-batch (share), and its loss is summed over the
  processes (total), so the step's loss and gradient are those of one process with the whole batch;
- the parameters are DTensors: the parameter groups (SWAT's frozen phase, ML-LR's rates) and the
  hand-written AdamW work on them unchanged, element by element on each shard;
- a checkpoint is gathered into whole tensors (gather) and written by the first process alone, in
  the same HF format as a single process writes; resume puts each process's shard back (put).
`run` shards only the tuning: every process makes the probes, the scan and the evaluations whole
(the same work, so the first process's files are the run's and the others write to scratch
folders); after each tuning the gathered weights are put into an unsharded copy (whole_model).
Without torchrun (WORLD_SIZE unset or 1) every function here is the identity.
"""

import atexit
import datetime
import os
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from .files import SwatError


def size():
    """The number of processes of this run (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank():
    """This process's place among them (0: the one that writes files and prints)."""
    return dist.get_rank() if dist.is_initialized() else 0


def setup(device):
    """Join the process group torchrun started (gloo on CPU, NCCL on GPUs); on GPUs each process
    takes the GPU of its local rank, so "cuda" means that one. -> the device to use."""
    if size() == 1 or dist.is_initialized():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    backend = "nccl" if str(device).startswith("cuda") else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
    if rank() != 0:  # the first process speaks for all: the others' lines would repeat its own
        sys.stdout = open(os.devnull, "w", encoding="utf-8")  # errors still go to stderr
    return device


def shard(net, lora, batch_size):
    """FSDP2 over net: each block, then the root (embeddings, final norm, head)."""
    if lora:
        raise SwatError("LoRA under torchrun is not supported: tune LoRA in one process")
    if batch_size < size():
        raise SwatError(f"a batch of {batch_size} cannot be shared by {size()} processes")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = net.model.embed_tokens.weight.device
    mesh = init_device_mesh(device.type, (size(),))
    for block in net.model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def share(examples):
    """This process's part of a micro-batch: its slice of size() nearly equal ones, in order (so
    that N processes compute what one does with --accum N micro-batches of the slices)."""
    part = -(-len(examples) // size())  # the slices' length, rounded up
    return examples[rank() * part : (rank() + 1) * part]


def total(value):
    """A float summed over the processes (the step's loss from each one's part)."""
    if size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item()


def peak(value):
    """A float's largest value over the processes (one all-reduce)."""
    if size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def whole(t):
    """A tensor in full: a DTensor's shards gathered (every process must call it), else t."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t):
    """This process's shard of a DTensor (elementwise work such as rounding), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def gather(tensors):
    """{name: tensor} with every DTensor gathered whole, in the same order on every process."""
    return {name: whole(t) for name, t in tensors.items()}


@torch.no_grad()
def put(target, value):
    """Copy a whole tensor into target: all of it, or this process's shard of a DTensor."""
    if hasattr(target, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        part = distribute_tensor(value.to(target.dtype), target.device_mesh, target.placements)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(value)


def barrier():
    """Wait for every process (the first one's files are written before the others go on)."""
    if size() > 1:
        dist.barrier()


def finish():
    """Close this process's part in the group once every process is done (one that exited with the
    group still open could abort the others' teardown: "terminate called without an exception")."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def scratch(out):
    """The folder this process writes `run`'s files into: out for the first process; for each of
    the others a new scratch folder, deleted at exit (each computes what the first one writes)."""
    if rank() == 0:
        return out
    folder = tempfile.mkdtemp(prefix=f"swat-min-rank{rank()}-")
    atexit.register(shutil.rmtree, folder, True)
    return os.path.join(folder, os.path.basename(os.path.normpath(out)))


def unsharded(fn):
    """fn(net), made to work on a sharded net too: the root's own weights (embeddings, final norm,
    head) are gathered around the call, since fn may call net's parts rather than net itself
    (each block gathers its own weights in its forward)."""

    def call(net):
        if not hasattr(net, "unshard"):
            return fn(net)
        net.unshard()
        try:
            return fn(net)
        finally:
            net.reshard()

    return call


@torch.no_grad()
def whole_model(net, fresh):
    """The tuned net whole on every process (for the evaluations, generation among them): a new
    unsharded model from fresh() given net's gathered weights. Without torchrun: net itself."""
    if size() == 1:
        return net
    copy = fresh()
    copy.load_state_dict(gather(net.state_dict()))
    return copy
