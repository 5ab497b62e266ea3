"""Tensor-parallel inference with torch's own `torch.distributed.tensor.parallel` (gloo on CPUs, NCCL on GPUs).

Megatron-LM's split (Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053, section 3): q, k, v, gate and up are
column-parallel (each rank computes some heads and some hidden units), o and down row-parallel (each rank's output
is a partial sum). PaLM's parallel block (Chowdhery et al. 2022, section 2) feeds one LayerNorm output to attention
and MLP, so the two partial sums are added first and reduced together: one all-reduce per block where a serial
block needs two.

Multi-query attention has one key/value head, which cannot be split: k_proj and v_proj stay whole on every rank,
each rank computes the same head and caches it (a decode step reads d_model x head_dim x 2 such weights per layer,
small beside the sharded ones). With n_kv_heads a multiple of the ranks (GQA, MHA) k and v are column-parallel
too, and each rank's KV cache holds its own heads only.

The shared embedding is sharded by vocabulary (the lookup is an all-reduce, the output layer an all-gather of each
rank's logits; the faster choice in `benchmarks/bench_tp.py`, and 1/N of its memory per rank) or, with
vocab_parallel=False, replicated (no communication; each rank reads the whole vocabulary for the output layer).

Serving (`palmkit serve --tp N`): rank 0 runs the engine and HTTP server; its model is a `Leader` that sends each
forward pass's inputs to the other ranks, which `follow` until the engine stops. `palmkit generate --tp N` needs
no leader: every rank runs the same generation (all-reduce results are identical on every rank).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import weakref
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from palmkit.errors import PalmkitError
from palmkit.infer.engine import DTYPES, Engine, EngineOptions, move_cache_row
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.fused import is_fused, unfuse_projections
from palmkit.model.palm import Block, KVCache, PaLM
from palmkit.model.quant import Int8Linear
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.distributed import Dist, init_distributed

log = logging.getLogger(__name__)


class Int8Parallel(ParallelStyle):
    """Column- (dim 0) or row-parallel (dim 1) sharding of an Int8Linear, which torch's styles do not know.

    Local tensors in and out, as ColwiseParallel and RowwiseParallel(output_layouts=Partial()) give for nn.Linear:
    the int8 kernel has no DTensor rule. A row of the weight keeps its own scale, so columns shard with their
    scales and a row-parallel shard scales its partial sum exactly as the whole layer would.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, Int8Linear):
            raise NotImplementedError(f"Int8Parallel shards Int8Linear, not {type(module).__name__}")
        module.weight = _local_shard(module.weight, device_mesh, self.dim)
        if self.dim == 0:
            module.weight_scale = _local_shard(module.weight_scale, device_mesh, 0)
        module.out_features, module.in_features = module.weight.shape
        return module


def _local_shard(t: torch.Tensor, mesh: DeviceMesh, dim: int) -> torch.Tensor:
    # src_data_rank=None: every rank loaded the same weights, so each keeps its own chunk without communicating
    return distribute_tensor(t, mesh, [Shard(dim)], src_data_rank=None).to_local()


class MatrixRowwiseParallel(RowwiseParallel):
    """RowwiseParallel that multiplies a (..., in) input as one (rows, in) matrix and gives back (..., out).

    Under inference mode torch (2.13) finds no cached sharding plan for a row-parallel matmul of a 3-D input and
    plans it again at every call; a 2-D input takes the cached plan (benchmarks/README.md, "bench_tp.py").
    """

    @staticmethod
    def _prepare_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
        x = inputs[0]
        mod.leading_shape = x.shape[:-1]
        return RowwiseParallel._prepare_input_fn(input_layouts, desired_input_layouts, mod,
                                                 (x.reshape(-1, x.shape[-1]),), device_mesh)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        out = RowwiseParallel._prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh)
        return out.view(*mod.leading_shape, out.shape[-1])


def column_parallel(module: nn.Module) -> ParallelStyle:
    return Int8Parallel(0) if isinstance(module, Int8Linear) else ColwiseParallel()


def row_parallel(module: nn.Module) -> ParallelStyle:
    # Partial: the block adds attention's and the MLP's partial sums before its one all-reduce
    return Int8Parallel(1) if isinstance(module, Int8Linear) else MatrixRowwiseParallel(output_layouts=Partial())


class ParallelBlock(nn.Module):
    """A Block whose attention and MLP outputs are partial sums: y = x + all_reduce(attn(ln(x)) + mlp(ln(x))).

    For inference: dropout is left out.
    """

    def __init__(self, block: Block, group: dist.ProcessGroup):
        super().__init__()
        self.input_layernorm, self.self_attn, self.mlp = block.input_layernorm, block.self_attn, block.mlp
        self.group = group

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None):
        h = self.input_layernorm(x)
        # Reduced in fp32: the sum of bf16 partial sums would round once more than one process's matmul does
        y = (self.self_attn(h, cos, sin, mask, positions, cache) + self.mlp(h)).float()
        dist.all_reduce(y, group=self.group)
        return x + y.to(x.dtype)


class TensorParallelPaLM(nn.Module):
    """A PaLM model split over the ranks of `mesh`, with the methods generation and the engine use.

    `config` is the shape of this rank's shard (its query and key/value heads), which is what a KV cache
    allocated from it needs; `full_config` is the model's.
    """

    def __init__(self, model: PaLM, mesh: DeviceMesh, vocab_parallel: bool = True):
        super().__init__()
        cfg, tp = model.config, mesh.size()
        if cfg.n_heads % tp:
            raise PalmkitError(f"--tp {tp} does not divide the model's {cfg.n_heads} attention heads")
        shard_kv = cfg.n_kv_heads % tp == 0
        if cfg.n_kv_heads > 1 and not shard_kv:
            raise PalmkitError(f"--tp {tp} does not divide the model's {cfg.n_kv_heads} key/value heads")
        if is_fused(model):  # a fused in_proj mixes q, k, v, gate and up rows: split it back first
            unfuse_projections(model)
        self.model, self.mesh, self.vocab_parallel = model.eval(), mesh, vocab_parallel
        self.full_config = cfg
        group = mesh.get_group()
        for i, block in enumerate(model.layers):
            attn, mlp = block.self_attn, block.mlp
            kinds = {type(m) for m in (attn.q_proj, attn.k_proj, attn.o_proj, mlp.gate_proj, mlp.down_proj)}
            if not kinds <= {nn.Linear, Int8Linear}:
                raise PalmkitError("tensor parallelism splits plain or int8 projections; this checkpoint has "
                                   f"{', '.join(sorted(k.__name__ for k in kinds))}")
            plan = {"q_proj": column_parallel(attn.q_proj), "o_proj": row_parallel(attn.o_proj)}
            if shard_kv:
                plan |= {"k_proj": column_parallel(attn.k_proj), "v_proj": column_parallel(attn.v_proj)}
            parallelize_module(attn, mesh, plan, src_data_rank=None)
            parallelize_module(mlp, mesh, {"gate_proj": column_parallel(mlp.gate_proj),
                                           "up_proj": column_parallel(mlp.up_proj),
                                           "down_proj": row_parallel(mlp.down_proj)}, src_data_rank=None)
            attn.n_heads //= tp
            attn.n_kv_heads //= tp if shard_kv else 1
            model.layers[i] = ParallelBlock(block, group)
        if vocab_parallel:
            # The lookup: each rank fills the rows of its vocabulary slice, an all-reduce adds them
            parallelize_module(model.embed_tokens, mesh, RowwiseParallel(input_layouts=Replicate()),
                               src_data_rank=None)
            if model.lm_head is not None:
                parallelize_module(model.lm_head, mesh, Int8Parallel(0), src_data_rank=None)
        self.config = dataclasses.replace(cfg, n_heads=cfg.n_heads // tp,
                                          n_kv_heads=cfg.n_kv_heads // tp if shard_kv else cfg.n_kv_heads)

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed_tokens

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      n_keys: int | None = None) -> torch.Tensor:
        """`PaLM.hidden_states`, on every rank at once."""
        return self.model.hidden_states(idx, positions, pad_mask, cache, n_keys)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary (B, ..., V) on every rank."""
        m = self.model
        if not self.vocab_parallel:
            return m.logits(h)
        local = m.lm_head(h) if m.lm_head is not None else F.linear(h, m.embed_tokens.weight.to_local())
        shape = (*h.shape[:-1], self.full_config.vocab_size)
        # An all-gather of each rank's vocabulary slice (DTensor pads uneven slices)
        full = DTensor.from_local(local * m.logit_scale, self.mesh, [Shard(-1)], run_check=False, shape=shape,
                                  stride=torch.empty(shape, device="meta").stride())
        return full.full_tensor()

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(idx, positions, pad_mask, cache))


def tensor_parallel(model: PaLM, d: Dist, vocab_parallel: bool = True) -> TensorParallelPaLM:
    """Split `model` (the same weights loaded on every rank) over all ranks of the process group."""
    mesh = init_device_mesh(d.device.type, (d.world_size,))
    return TensorParallelPaLM(model, mesh, vocab_parallel)


def control_group() -> dist.ProcessGroup:
    """A gloo group for the leader's small host-side messages, whatever the backend of the model's collectives.

    Its timeout is long because an idle server's followers wait on it for the next request.
    """
    return dist.new_group(backend="gloo", timeout=timedelta(days=365))


# The leader's messages: a header of HEADER int64s [op, ...], then the tensors that op names.
HEADER = 12
STOP, HIDDEN, LOGITS, NEW_CACHE, FREE_CACHE, MOVE = range(6)
DTYPE_CODES = [torch.float32, torch.bfloat16, torch.float16]


class Leader(nn.Module):
    """Rank 0's model when serving: before each forward pass it sends the inputs to the followers.

    KV caches are named by an id: a cache the leader has not seen is announced (the followers allocate theirs),
    one it frees is dropped at the next message; a slice of a cache (the engine's slots) is its id and first row.
    """

    def __init__(self, tp: TensorParallelPaLM, group: dist.ProcessGroup):
        super().__init__()
        self.tp, self.group, self.config = tp, group, tp.config
        self._ids = itertools.count()
        self._caches: dict[int, int] = {}  # id() of a cache's base tensor -> the cache's id
        self._freed: list[int] = []
        self._released = False

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.tp.embed_tokens

    def _send(self, *header: int, tensors: tuple[torch.Tensor, ...] = ()) -> None:
        while self._freed:
            self._header(FREE_CACHE, self._freed.pop())
        self._header(*header)
        for t in tensors:
            dist.broadcast(t.to("cpu", torch.int64).contiguous(), 0, group=self.group)

    def _header(self, *values: int) -> None:
        dist.broadcast(torch.tensor([*values, *[0] * (HEADER - len(values))]), 0, group=self.group)

    def _cache_id(self, cache: KVCache) -> tuple[int, int]:
        k = cache.k[0]
        base = k if k._base is None else k._base
        cid = self._caches.get(id(base))
        if cid is None:
            cid = self._caches[id(base)] = next(self._ids)
            self._send(NEW_CACHE, cid, base.shape[0], base.shape[2], DTYPE_CODES.index(base.dtype))
            weakref.finalize(base, self._forget, id(base), cid)
        return cid, (k.storage_offset() - base.storage_offset()) // base.stride(0)

    def _forget(self, key: int, cid: int) -> None:
        self._caches.pop(key, None)
        self._freed.append(cid)

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      n_keys: int | None = None) -> torch.Tensor:
        cid, first = self._cache_id(cache) if cache is not None else (-1, 0)
        pos_shape = tuple(positions.shape) if positions is not None else (0, 0)
        sent = tuple(t for t in (idx, positions, pad_mask) if t is not None)
        self._send(HIDDEN, *idx.shape, *pos_shape, pad_mask is not None, cid, first,
                   -1 if n_keys is None else n_keys, tensors=sent)
        return self.tp.hidden_states(idx, positions, pad_mask, cache, n_keys)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.tp.vocab_parallel:  # the followers hold the other vocabulary slices: they need h
            self._send(LOGITS, h.dim(), *h.shape, DTYPE_CODES.index(h.dtype))
            dist.broadcast(h.contiguous(), 0, group=self.tp.mesh.get_group())
        return self.tp.logits(h)

    def move_cache_row(self, cache: KVCache, src: int, dst: int, n: int) -> None:
        """Copy row `src`'s first n positions into row `dst`, on every rank."""
        cid, first = self._cache_id(cache)
        self._send(MOVE, cid, first + src, first + dst, n)
        move_cache_row(cache, src, dst, n)

    def release(self) -> None:
        """Let the followers return (once)."""
        if not self._released:
            self._released = True
            self._send(STOP)


def follow(tp: TensorParallelPaLM, group: dist.ProcessGroup) -> None:
    """Run the forward passes rank 0's `Leader` announces until it stops.

    An error of a pass ends this process: the other ranks would otherwise wait forever for its part of the pass's
    collectives (an error of this rank alone: out of memory, a device fault). torchrun then stops the whole group,
    and a supervisor restarts the server (`palmkit serve` exits with status 1 when its engine dies).
    """
    caches: dict[int, KVCache] = {}
    device = tp.embed_tokens.weight.device
    while True:
        header = torch.zeros(HEADER, dtype=torch.int64)
        dist.broadcast(header, 0, group=group)
        op, *a = header.tolist()
        if op == STOP:
            return
        try:
            if op == NEW_CACHE:
                caches[a[0]] = KVCache(tp.config, a[1], a[2], DTYPE_CODES[a[3]], device)
            elif op == FREE_CACHE:
                del caches[a[0]]
            elif op == MOVE:
                move_cache_row(caches[a[0]], a[1], a[2], a[3])
            elif op == HIDDEN:
                _follow_hidden(tp, group, caches, device, a)
            elif op == LOGITS:
                h = torch.empty(a[1:1 + a[0]], dtype=DTYPE_CODES[a[1 + a[0]]], device=device)
                dist.broadcast(h, 0, group=tp.mesh.get_group())
                tp.logits(h)
        except Exception:
            log.critical("follower: a forward pass failed; stopping this rank so the group does not wait for it",
                         exc_info=True)
            raise


def _follow_hidden(tp: TensorParallelPaLM, group: dist.ProcessGroup, caches: dict[int, KVCache],
                   device: torch.device, a: list[int]) -> None:
    b, t, pb, pt, has_mask, cid, first, n_keys = a[:8]

    def receive(shape: tuple[int, ...]) -> torch.Tensor:
        x = torch.empty(shape, dtype=torch.int64)
        dist.broadcast(x, 0, group=group)
        return x.to(device)

    idx = receive((b, t))
    positions = receive((pb, pt)) if pb else None
    pad_mask = receive((b, t)).bool() if has_mask else None
    cache = caches[cid].rows(slice(first, first + b)) if cid >= 0 else None
    tp.hidden_states(idx, positions, pad_mask, cache, None if n_keys < 0 else n_keys)


class TensorParallelEngine(Engine):
    """The engine of rank 0 in a tensor-parallel server: its model is a `Leader`, and when its thread ends
    (stopped or failed) the followers are let go."""

    def _move_row(self, src: int, dst: int, n: int) -> None:
        self.model.move_cache_row(self.cache, src, dst, n)

    def _loop(self) -> None:
        try:
            super()._loop()
        finally:
            self.model.release()


def tensor_parallel_engine(checkpoint: str, tp: int, options: EngineOptions | None = None,
                           vocab_parallel: bool = True) -> tuple[Engine | None, dict]:
    """(engine, config) on rank 0 of a torchrun group of `tp` processes; the other ranks follow rank 0's
    forward passes here until its engine stops, then get (None, config). `options.device` is ignored: each rank
    takes its own device."""
    options = options or EngineOptions()
    d = require_world(tp, "serve")
    model, tokenizer, config = load_checkpoint(checkpoint, device=d.device, dtype=DTYPES[options.dtype])
    split = tensor_parallel(model, d, vocab_parallel)
    group = control_group()
    if not d.is_main:
        with torch.inference_mode():
            follow(split, group)
        return None, config
    return TensorParallelEngine(Leader(split, group), tokenizer, options), config


def load_tensor_parallel(checkpoint: str, tp: int, command: str, dtype: torch.dtype | None = None,
                         vocab_parallel: bool = True) -> tuple[TensorParallelPaLM, Tokenizer, Dist]:
    """(split model, tokenizer, this rank) for a command every rank runs alike (`palmkit generate --tp N`)."""
    d = require_world(tp, command)
    model, tokenizer, _ = load_checkpoint(checkpoint, device=d.device, dtype=dtype)
    return tensor_parallel(model, d, vocab_parallel), tokenizer, d


def agree_on_seed(seed: int | None, d: Dist) -> int:
    """The seed every rank samples with: `seed`, or one rank 0 draws (ranks drawing apart would feed the split
    model different tokens)."""
    if seed is not None:
        return seed
    t = torch.randint(0, 2**62, (1,), device=d.device)
    dist.broadcast(t, 0)
    return int(t)


def require_world(tp: int, command: str) -> Dist:
    """This rank of a torchrun group of exactly `tp` processes."""
    d = init_distributed()
    if d.world_size != tp:
        raise PalmkitError(f"--tp {tp} needs {tp} processes, found {d.world_size}: run "
                           f"torchrun --nproc_per_node={tp} -m palmkit.cli {command} --tp {tp} ...")
    return d
