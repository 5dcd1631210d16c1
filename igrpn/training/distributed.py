"""Device choice, process group and model wrapping for data-parallel training under torchrun.

    torchrun --nproc_per_node=N [--nnodes=M --node_rank=R --master_addr=HOST --master_port=PORT] \\
        -m igrpn.train --profile paper --method rpn --out runs/rpn_ib

torchrun starts one process per GPU (or per CPU slot) and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in each; :func:`init_distributed` reads them.
A process started without them (plain ``python -m igrpn.train``, a notebook) is a group of one:
every helper here then does nothing, so the single-process code path stays unchanged.

Backend: NCCL when the processes train on CUDA devices (one device per process, chosen by
``LOCAL_RANK``), Gloo on the CPU. Mixed precision: :func:`autocast` gives bf16 autocast on CUDA and
on CPUs with native bf16 (AMX or AVX512-BF16), plain fp32 elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

DEVICE_CHOICES = ("auto", "cpu", "cuda")
#: Environment variables torchrun sets in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process trains and its place in the group.

    Attributes:
        rank: global rank, 0 … world_size − 1 (0 writes the log and the checkpoints).
        world_size: number of processes (1 without torchrun).
        local_rank: rank on this node; picks the CUDA device.
        device: the torch device this process computes on.
        backend: ``"nccl"``, ``"gloo"`` or ``None`` (a group of one, no process group).
        created_group: True when :func:`init_distributed` created the process group (and so its
            caller should :func:`cleanup` it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    created_group: bool = False

    @property
    def distributed(self) -> bool:
        """True when gradients are averaged over more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device named by ``device`` (``auto``: CUDA when available, else CPU).

    Raises:
        ValueError: an unknown name, or ``cuda`` on a machine where torch sees no CUDA device, or
            a ``local_rank`` beyond the visible CUDA devices.
    """
    name = torch.device(device).type if isinstance(device, torch.device) else str(device)
    if name not in DEVICE_CHOICES:
        raise ValueError(f"device must be one of {DEVICE_CHOICES}, got {device!r}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device 'cuda' was asked for but torch {torch.__version__} sees no CUDA device "
            "(a CPU-only build, or no GPU visible); use --device cpu or auto"
        )
    if local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {local_rank} needs CUDA device {local_rank} but only "
            f"{torch.cuda.device_count()} are visible; start at most that many processes per node"
        )
    return torch.device("cuda", local_rank)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group described by torchrun's environment variables.

    Without ``WORLD_SIZE`` > 1 no group is created and the context is a group of one on
    :func:`resolve_device` (``device``). With it, the process computes on CUDA device
    ``LOCAL_RANK`` (NCCL backend) or on the CPU (Gloo backend). A group that already exists (made
    by the caller) is joined as it is and left to its creator to destroy.

    Args:
        device: ``auto``, ``cpu`` or ``cuda``.
        timeout_s: how long a collective (a barrier, a gradient all-reduce) waits for the slowest
            process before failing; rank 0's validation and checkpoint writing must fit in it.

    Raises:
        ValueError: malformed or inconsistent torchrun variables, or an unavailable device.
    """
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = _env_int("LOCAL_RANK", 0)
        backend = dist.get_backend()
        # An existing NCCL group means the caller already trains on CUDA.
        on_device = resolve_device("cuda" if backend == "nccl" else device, local_rank)
        return DistributedContext(rank, world_size, local_rank, on_device, backend, created_group=False)

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ValueError(
            f"inconsistent torchrun variables: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank} "
            "(need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)"
        )
    on_device = resolve_device(device, local_rank if world_size > 1 else 0)
    if world_size == 1:
        return DistributedContext(device=on_device)

    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ValueError(
            f"WORLD_SIZE={world_size} but {', '.join(missing)} not set: start the processes with torchrun"
        )
    if not dist.is_available():
        raise ValueError(f"WORLD_SIZE={world_size} but this torch build has no torch.distributed")
    backend = "nccl" if on_device.type == "cuda" else "gloo"
    if on_device.type == "cuda":
        # Each process owns one GPU; NCCL's collectives run on the current device.
        torch.cuda.set_device(on_device)
    dist.init_process_group(
        backend=backend, init_method="env://", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        device_id=on_device if backend == "nccl" else None,
    )
    return DistributedContext(rank, world_size, local_rank, on_device, backend, created_group=True)


def is_distributed() -> bool:
    """True inside a process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True in the process that writes logs and checkpoints (global rank 0, or no group)."""
    return get_rank() == 0


def _collective_device() -> torch.device:
    """Device of the tensors the group's backend reduces (NCCL: the current GPU; Gloo: CPU)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every process of the group gets here (no-op without a group)."""
    if not is_distributed():
        return
    if dist.get_backend() == "nccl":
        # Name the device, else NCCL guesses one from the rank and may pick another process's GPU.
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_reduce_mean(value):
    """Mean of ``value`` over the processes of the group (identity without a group).

    Args:
        value: a tensor (any shape; a reduced copy is returned, the input is left alone), a Python
            number, or a dict of str -> number (reduced in one collective).

    Returns:
        The same kind of object: a tensor (on ``value``'s device, in its dtype), a float, or a
        dict of floats.
    """
    if isinstance(value, dict):
        keys = list(value)
        reduced = all_reduce_mean(torch.tensor([float(value[k]) for k in keys], dtype=torch.float64))
        return dict(zip(keys, reduced.tolist()))
    if not torch.is_tensor(value):
        return float(all_reduce_mean(torch.tensor(float(value), dtype=torch.float64)))
    if not is_distributed():
        return value
    # float64 for the sum (NCCL reduces it on the GPU; Gloo on the CPU), then back.
    buffer = value.detach().to(_collective_device(), dtype=torch.float64, copy=True)
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
    return (buffer / dist.get_world_size()).to(value.device, dtype=value.dtype)


def all_ranks_equal(value: int) -> bool:
    """True when every process passes the same integer (always True without a group)."""
    if not is_distributed():
        return True
    # One MAX reduction of (v, −v) gives the maximum and minus the minimum together.
    pair = torch.tensor([int(value), -int(value)], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(pair, op=dist.ReduceOp.MAX)
    return int(pair[0]) == -int(pair[1])


def cleanup() -> None:
    """Destroy the default process group, if there is one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def place_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Put ``model`` on ``context.device``, its BatchNorm layers synchronised across GPUs.

    With several CUDA processes every BatchNorm becomes a ``SyncBatchNorm``: the paper profile
    trains on 2 volumes per GPU, and batch statistics over 2 volumes are noisy and differ from
    rank to rank; synchronising them makes the statistics those of the global batch (2 ×
    world_size volumes), i.e. the same normalisation as one process with the global batch. The
    state_dict keys and shapes are unchanged, so the checkpoint loads into a plain model.
    torch implements SyncBatchNorm for CUDA only, so on the CPU (Gloo) each process keeps its own
    per-rank BatchNorm statistics (and DDP copies rank 0's running statistics to the others at
    each forward).

    Call it before the optimiser is created (the conversion replaces modules and parameters).
    """
    if context.distributed and context.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(context.device)


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """``DistributedDataParallel(model)`` inside a group of several processes, else ``model``.

    The returned module's ``forward`` is the one to call in training (it averages the gradients
    over the processes during ``backward``); ``model`` itself keeps ``loss``/``candidates`` and
    its ``state_dict`` is what a checkpoint stores (see :func:`unwrap`).
    """
    if not context.distributed:
        return model
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def shard_sampler(dataset, context: DistributedContext, seed: int) -> DistributedSampler:
    """A seeded, shuffling sampler giving each process a disjoint shard of ``dataset``.

    Every process draws the same permutation (seeded by ``seed`` and the epoch: call
    ``sampler.set_epoch(epoch)`` before each epoch) and takes every ``world_size``-th index from
    its rank; the last ``len(dataset) % world_size`` indices of the permutation are dropped, so the
    shards never overlap and every process makes the same number of steps.

    Raises:
        ValueError: fewer samples than processes (a process would have nothing to train on).
    """
    if len(dataset) < context.world_size:
        raise ValueError(
            f"the training set has {len(dataset)} volumes, fewer than the {context.world_size} processes "
            "it must be shared among"
        )
    return DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True,
                              seed=seed, drop_last=True)


def cpu_computes_bf16() -> bool:
    """True when this CPU has AMX-BF16 tile instructions (read from ``/proc/cpuinfo``) and
    PyTorch's oneDNN can use them. AVX512-BF16 alone is not enough: without AMX, bf16 convolutions
    ran slower than fp32 (docs/design.md §10.14, docs/accuracy.md §13). ``IGRPN_CPU_BF16=0`` in the
    environment forces False, ``IGRPN_CPU_BF16=1`` True."""
    forced = os.environ.get("IGRPN_CPU_BF16", "")
    if forced in ("0", "1"):
        return forced == "1" and torch.backends.mkldnn.is_available()
    return "amx_bf16" in _cpu_flags() and torch.backends.mkldnn.is_available()


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def mixed_precision(device: torch.device) -> bool:
    """Whether :func:`autocast` computes in bf16 on ``device``: a CUDA device with native bf16
    (Ampere and later) or a CPU with native bf16 (:func:`cpu_computes_bf16`)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_computes_bf16()


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision for forward and loss: bf16 autocast where the device computes bf16 natively
    (:func:`mixed_precision`; docs/design.md §10.14), fp32 (no autocast) elsewhere or when not
    ``enabled``.

    bf16 keeps fp32's exponent range, so no loss scaling is needed; the losses (cross-entropy,
    smooth-L1, BCE) run in fp32 under autocast anyway and the weights and optimiser state stay
    fp32. Use it around ``forward`` and ``loss`` only, not around ``backward``.
    """
    device = torch.device(device)
    if enabled and mixed_precision(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
