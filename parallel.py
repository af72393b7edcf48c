"""
parallel.py: how train.py spreads over processes. torchrun starts them, on one machine or many
through its rendezvous, and each becomes a rank of one process group (gloo on CPU, NCCL on GPU).
There are two ways to spread the model:
- ddp: every rank holds the whole model, its gradients and AdamW state, and the gradients are
  averaged (DistributedDataParallel). Use it for models that fit.
- fsdp: PyTorch's FSDP2 (fully_shard). Each transformer block's parameters, gradients and AdamW
  state are split between the ranks and gathered only for that block's forward and backward; the
  root (embedding, final norm, output head) is split the same way. That is about 1/N of DDP's
  per rank. On a GPU it computes in bf16 with fp32 gradient reduction, and can keep the shards in
  CPU memory.

    torchrun --nproc_per_node 8 train.py CHECKPOINT --parallel fsdp --data FILE --out DIR
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        --rdzv-id RUN train.py CHECKPOINT --parallel fsdp --data FILE --out DIR  # on each node

Checkpoints hold whole tensors, whatever wrote them. Saving gathers each sharded tensor in turn
(every rank takes part, rank 0 keeps it). Resuming gives each rank its shard of the saved
tensor. So a checkpoint is the stock layout, a resume may switch between ddp and fsdp, and the
training state reads with safetensors alone. The cost is rank 0's CPU memory: it holds the whole
state while writing. Imports nothing of ours.
"""
import os

import torch
import torch.nn as nn

PARALLEL = ("ddp", "fsdp")


def setup(device: str, parallel: str) -> tuple[int, int, str, bool]:
    """-> (rank, world size, this process's device, whether this call made the process group).
    torchrun's environment makes the group; FSDP2 needs one even on a single process, so it gets a
    group of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and parallel == "ddp":
        return 0, 1, device, False
    import torch.distributed as dist
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    made = not dist.is_initialized()
    if made:
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size(), device, made


def teardown(made: bool) -> None:
    """Ends the process group that setup made, once the run has finished. Without it gloo's
    threads can outlive the interpreter and abort the process at exit ("terminate called without
    an active exception"), failing a run that had finished. The barrier first: rank 0 saves while
    the others are done, and a rank that tore its group down and exited meanwhile aborted the
    same way (1 finished run in 4 on 2 loaded CPUs). Not called after an error: another rank may
    still wait in a collective, and the destroy would hang on it."""
    if made:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()


def wrap(objective: nn.Module, model: nn.Module, parallel: str, world: int, device: str,
         mixed: bool, cpu_offload: bool, unused_parameters: bool) -> nn.Module:
    """The objective (a module whose forward runs `model`) as each rank runs it.

    fsdp: every block of model.layers is a shard group, then the root. The root keeps its
    parameters gathered after its forward (reshard_after_forward=False), because the loss and
    the perplexity call model.lm_head after model.hidden has returned. mixed: bf16 parameters in
    the forward and backward, gradients reduced in fp32. ddp on many processes:
    DistributedDataParallel (unused_parameters when some may get no gradient, as unchosen MoE
    routes can). One process with ddp: the objective as it is."""
    if parallel == "fsdp":
        from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy,
                                            fully_shard, register_fsdp_forward_method)
        policy = dict(
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if mixed else MixedPrecisionPolicy(),
            offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
        for block in model.layers:
            fully_shard(block, **policy)
        fully_shard(model, reshard_after_forward=False, **policy)
        register_fsdp_forward_method(model, "hidden")  # gathers the root as forward does
        return objective
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(objective, find_unused_parameters=unused_parameters)
    return objective

# -----------------------------------------------------------------------------
# whole tensors from shards and back, and what needs every rank's shards (the gradient norm)


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a shard (a DTensor, FSDP2's parameters and their AdamW state); any other
    tensor as it is. For a shard this is a collective: every rank calls it, in the same order."""
    from torch.distributed.tensor import DTensor
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def shard_like(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor laid out as `like`: this rank's shard of it where `like` is a shard (every
    rank holds the same whole tensor), on like's device otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(like, DTensor):
        return tensor.to(like.device)
    mesh = like.device_mesh
    parts = distribute_tensor(tensor.to(mesh.device_type), mesh, like.placements)
    out = torch.empty_like(like, dtype=tensor.dtype)  # a DTensor on like's own device (offload)
    out.to_local().copy_(parts.to_local())
    return out


def clip_gradients(parameters: list[torch.Tensor], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ (the same two steps), with the norm made whole across the
    shards first. -> the norm before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = whole(torch.nn.utils.get_total_norm(grads))
    torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
    return norm.item()


def peak_memory(device: str) -> float:
    """This process's peak memory in bytes: the device's allocator on a GPU, the resident set on
    a CPU."""
    if device.startswith("cuda"):
        return float(torch.cuda.max_memory_allocated(device))
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB
