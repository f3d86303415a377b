"""Where a token's K and V live inside a paged KV cache, for any backend.

Attention backends pack K/V inside a block differently (vLLM's CPU backend,
for example, stores each block's keys transposed, [head_dim, block_size],
and the packing depends on the CPU ISA). Rather than hard-coding layouts,
BASTION *probes* the backend: it writes tokens whose values encode
(slot, head, dim, K-or-V) through the backend's own `do_kv_cache_update`
into a two-block scratch cache of the same strides, and reads back where
every element landed. The result is an exact element-address map that

  * gathers a request's cached prefix for tree attention, and
  * copies accepted tree nodes' K/V between slots (KV compaction),

for every layer with that backend, shape and dtype. A layout the probe cannot
decode (e.g. a quantized fp8 cache) raises a clear error instead of being
guessed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_PROBE_CACHE: dict[tuple, "PagedKVLayout"] = {}


class KVLayoutError(RuntimeError):
    pass


@dataclass
class PagedKVLayout:
    """Affine placement of K and V inside one layer's paged cache tensor.

    Element (block b, slot-in-block t, kv head h, dim d) of K lives at storage
    offset  b * block_stride + k_base + t * k_strides[0] + h * k_strides[1]
    + d * k_strides[2]  (relative to the cache tensor's storage offset), V
    likewise. `views` turns that into [num_blocks, block_size, H, D] tensors,
    the interface of the tree attention and compaction kernels.
    """

    block_size: int
    block_dim: int
    block_stride: int
    k_base: int
    k_strides: tuple[int, int, int]
    v_base: int
    v_strides: tuple[int, int, int]
    num_kv_heads: int
    head_size: int

    def views(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nb = kv_cache.shape[self.block_dim]
        size = (nb, self.block_size, self.num_kv_heads, self.head_size)
        off = kv_cache.storage_offset()
        k = torch.as_strided(kv_cache, size, (self.block_stride, *self.k_strides), off + self.k_base)
        v = torch.as_strided(kv_cache, size, (self.block_stride, *self.v_strides), off + self.v_base)
        return k, v


def probe_layout(impl, layer, kv_cache: torch.Tensor, block_size: int, num_blocks: int) -> PagedKVLayout:
    """Decode the backend's in-block K/V placement (cached per layout key)."""
    key = (
        type(impl),
        tuple(kv_cache.shape),
        tuple(kv_cache.stride()),
        kv_cache.dtype,
        block_size,
        getattr(layer, "isa", None),
    )
    layout = _PROBE_CACHE.get(key)
    if layout is None:
        layout = _probe(impl, layer, kv_cache, block_size, num_blocks)
        _PROBE_CACHE[key] = layout
    return layout


def _probe(impl, layer, kv_cache, block_size, num_blocks) -> PagedKVLayout:
    H = impl.num_kv_heads
    D = impl.head_size
    dims = [i for i, s in enumerate(kv_cache.shape) if s == num_blocks]
    if len(dims) != 1:
        raise KVLayoutError(
            f"cannot find the block dimension of KV cache shape {tuple(kv_cache.shape)} "
            f"({num_blocks} blocks)"
        )
    bdim = dims[0]
    # a two-block scratch with the cache's physical dimension order
    shape = list(kv_cache.shape)
    shape[bdim] = 2
    order = sorted(range(kv_cache.dim()), key=lambda i: -kv_cache.stride(i))
    phys = torch.zeros([shape[i] for i in order], dtype=kv_cache.dtype, device=kv_cache.device)
    inv = [order.index(i) for i in range(kv_cache.dim())]
    scratch = phys.permute(inv)

    n = 2 * block_size
    slots = torch.arange(n, device=kv_cache.device, dtype=torch.long)
    t = (slots % block_size).view(n, 1, 1).expand(n, H, D)
    b = (slots // block_size).view(n, 1, 1).expand(n, H, D)
    h = torch.arange(H, device=kv_cache.device).view(1, H, 1).expand(n, H, D)
    d = torch.arange(D, device=kv_cache.device).view(1, 1, D).expand(n, H, D)
    # small integers are exact in every float format >= 8 bits of mantissa
    fields = {"t": t, "b": b, "h": h, "dlo": d % 128, "dhi": d // 128}
    decoded: dict[str, torch.Tensor] = {}
    dtype = _value_dtype(kv_cache.dtype)
    for name, val in list(fields.items()) + [("kv", None)]:
        scratch.zero_()
        if name == "kv":
            k = torch.ones(n, H, D)
            v = torch.full((n, H, D), 2.0)
        else:
            k = (val + 1).float()
            v = (val + 1).float()
        impl.do_kv_cache_update(
            layer, k.to(dtype).to(kv_cache.device), v.to(dtype).to(kv_cache.device), scratch, slots
        )
        decoded[name] = scratch.float().reshape(-1).clone()
    written = decoded["kv"] > 0
    total = int(written.sum())
    if total != 2 * n * H * D:
        raise KVLayoutError(
            f"probe wrote {total} elements, expected {2 * n * H * D}: the KV cache "
            f"dtype {kv_cache.dtype} or layout is not supported by BASTION's tree "
            "attention yet (quantized KV caches are not)"
        )
    vals = {k2: (v2 - 1).round().long() for k2, v2 in decoded.items()}
    for name, hi in (("t", block_size), ("b", 2), ("h", H), ("dlo", min(D, 128)), ("dhi", math.ceil(D / 128)), ("kv", 2)):
        got = vals[name][written]
        if got.min() < 0 or got.max() >= hi:
            raise KVLayoutError(
                f"KV layout probe decoded an out-of-range {name}; the KV cache dtype "
                f"{kv_cache.dtype} is not supported by BASTION's tree attention yet"
            )
    # logical coordinates (in the scratch) of every written element
    idx = torch.nonzero(written.view(scratch.shape), as_tuple=False)  # [M, ndim]
    flat_written = written.nonzero().squeeze(1)
    tt = vals["t"][flat_written]
    bb = vals["b"][flat_written]
    hh = vals["h"][flat_written]
    dd = vals["dlo"][flat_written] + 128 * vals["dhi"][flat_written]
    kvv = vals["kv"][flat_written]
    strides = torch.tensor(kv_cache.stride(), dtype=torch.long)
    coords = idx.clone()
    coords[:, bdim] = 0
    off = (coords.cpu() * strides).sum(1)
    block0 = bb == 0
    inner = torch.full((2, block_size, H, D), -1, dtype=torch.long)
    inner[kvv[block0].cpu(), tt[block0].cpu(), hh[block0].cpu(), dd[block0].cpu()] = off[block0.cpu()]
    if (inner < 0).any() or inner.unique().numel() != inner.numel():
        raise KVLayoutError(
            "KV layout probe found a non-bijective in-block layout; this attention "
            "backend is not supported by BASTION's tree attention yet"
        )
    # block 1 must be block 0 shifted by the block stride
    inner1 = torch.full_like(inner, -1)
    b1 = ~block0
    inner1[kvv[b1].cpu(), tt[b1].cpu(), hh[b1].cpu(), dd[b1].cpu()] = off[b1.cpu()]
    if not torch.equal(inner1, inner):
        raise KVLayoutError("KV layout probe: blocks are not laid out uniformly")
    bases, strides = [], []
    for kv in (0, 1):
        base = int(inner[kv, 0, 0, 0])
        st = (
            int(inner[kv, 1, 0, 0]) - base if block_size > 1 else 0,
            int(inner[kv, 0, 1, 0]) - base if H > 1 else 0,
            int(inner[kv, 0, 0, 1]) - base if D > 1 else 0,
        )
        t_ = torch.arange(block_size).view(-1, 1, 1)
        h_ = torch.arange(H).view(1, -1, 1)
        d_ = torch.arange(D).view(1, 1, -1)
        if not torch.equal(inner[kv], base + t_ * st[0] + h_ * st[1] + d_ * st[2]):
            raise KVLayoutError(
                "this attention backend packs K/V non-affinely inside a block; "
                "BASTION's tree attention does not support it yet"
            )
        bases.append(base)
        strides.append(st)
    return PagedKVLayout(
        block_size=block_size,
        block_dim=bdim,
        block_stride=kv_cache.stride(bdim),
        k_base=bases[0],
        k_strides=strides[0],
        v_base=bases[1],
        v_strides=strides[1],
        num_kv_heads=H,
        head_size=D,
    )


def _value_dtype(cache_dtype: torch.dtype) -> torch.dtype:
    if cache_dtype in (torch.float16, torch.bfloat16, torch.float32):
        return cache_dtype
    return torch.bfloat16
