"""torch.distributed setup and `parallelize()`: DDP or FSDP2, activation checkpointing, compile.

The model knows nothing of parallelism (torchtitan's habit): this module wraps it. gloo serves CPUs, NCCL GPUs.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from palmkit.errors import PalmkitError
from palmkit.model.fused import fuse_projections
from palmkit.model.palm import PaLM


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "") -> Dist:
    """Join the process group that torchrun describes in the environment; a lone process needs none.

    device: cpu, cuda (each rank takes GPU LOCAL_RANK) or cuda:N (one process); "": cuda when there is one.
    """
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise PalmkitError(f"--device {device}: torch sees no CUDA GPU (torch {torch.__version__})")
    if kind not in ("cpu", "cuda"):
        raise PalmkitError(f"--device {device}: palmkit trains on cpu or cuda")
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=torch.device(device or kind))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device_ = torch.device("cuda", local_rank)
    else:
        device_ = torch.device("cpu")
    if not dist.is_initialized():
        # NCCL moves GPU tensors over NVLink/InfiniBand; gloo is the CPU backend.
        dist.init_process_group("nccl" if device_.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device_)


def close_distributed(clean: bool = True) -> None:
    """Leave the process group before the interpreter exits.

    A gloo group left to the interpreter's shutdown can abort the process ("terminate called without an active
    exception") while its worker threads are torn down, turning a finished run into a failed torchrun. After a
    clean run every rank first meets at a barrier, so that no rank leaves while another still talks to it; after
    an error the group is only destroyed (a barrier would wait for ranks that may never come)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    dist.destroy_process_group()


def parallelize(model: torch.nn.Module, cfg, d: Dist) -> torch.nn.Module:
    """Activation checkpointing, then FSDP2 or DDP, then compile, in torchtitan's fixed order.

    `model` is a PaLM or a module that holds one as `.model` (a fine-tuning head); `cfg` any options with
    strategy, activation_checkpointing and compile (TrainConfig, FinetuneConfig, EngineConfig)."""
    palm = model if isinstance(model, PaLM) else model.model
    if getattr(cfg, "fuse_projections", False):
        fuse_projections(palm)
    if cfg.activation_checkpointing:
        for i, block in enumerate(palm.layers):
            palm.layers[i] = checkpoint_wrapper(block)
    if d.world_size > 1 and cfg.strategy == "fsdp":
        for block in palm.layers:
            fully_shard(block)  # each block's parameters are gathered only while it runs
        fully_shard(model)
    elif d.world_size > 1:
        model = DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    return model


def gather_objects(obj, d: Dist) -> list:
    """Every rank's `obj`, in rank order (picklable objects: RNG states, small records)."""
    if d.world_size == 1:
        return [obj]
    out: list = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce(values: list[float], d: Dist) -> list[float]:
    if d.world_size == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    inner = getattr(model, "_orig_mod", model)
    if hasattr(inner, "no_sync") and not enabled:
        return inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):
        inner.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()
