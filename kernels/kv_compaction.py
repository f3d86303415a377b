"""Accepted-path KV compaction: copy K/V between paged-cache slots, all layers at once.

After the tree walk accepts a path, the K/V of accepted node c_j (written at
slot p0 + c_j) must move to slot p0 + j (see vllm_bastion/core/compaction.py).
For every layer's (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]
with any strides (slot = block * block_size + offset):

    cache[dst[i]] = cache[src[i]]   for every pair i, sources read first.

Pairs with src < 0 or dst < 0 are skipped, so a CUDA graph can be captured
with a fixed number of pairs P padded with -1. Duplicate destinations are
undefined (as for any scatter).

The Triton kernel copies raw bytes (any 1/2/4/8-byte dtype, fp8 included)
in ONE launch per group of layers that share shape, strides and dtype (one
launch for a normal model):

  * grid = (2 * L caches, ceil(Hkv * D / BLOCK_C) column chunks); a program
    owns one cache tensor and a chunk of the Hkv*D columns, for ALL pairs.
    Programs therefore never touch the same bytes, so no cross-program
    ordering is relied on.
  * Inside a program the pairs are processed in chunks of BLOCK_P: load all
    sources of the chunk into registers, CTA barrier, store all destinations,
    barrier. BLOCK_P is next_pow2(P) up to a cap (512 pairs at BLOCK_C = 32),
    so for P <= cap the copy is exactly gather-then-scatter for ANY pairs
    (swaps and cycles included). For P > cap the chunks run in order, which
    is still exact when no pair's destination is the source of a pair in a
    LATER chunk, i.e. dst[i] != src[j] for i < j across chunks. BASTION's
    pairs satisfy this: within a request dst[i] < src[i] and sources
    increase, and requests own disjoint slots. The loop runs with
    num_stages=1 so loads of one chunk are never hoisted above the stores
    of the previous one.
  * Cache base addresses are passed as int64 element offsets relative to the
    first cache of the group (a device tensor built once per set of caches
    and memoized by data_ptr), so a launch needs no host->device copy and is
    CUDA-graph capturable once the table exists (call once before capture).
"""

from __future__ import annotations

import math
import os

import torch

try:  # the torch reference must work without Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = ["HAS_TRITON", "compact_kv_reference", "compact_kv", "KVPointerTable", "make_kv_pointer_table"]


def _valid_pairs(src_slots: torch.Tensor, dst_slots: torch.Tensor):
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError("src_slots and dst_slots must be 1-D of equal length")
    keep = (src_slots >= 0) & (dst_slots >= 0)
    return src_slots[keep].long(), dst_slots[keep].long()


def compact_kv_reference(caches, src_slots: torch.Tensor, dst_slots: torch.Tensor) -> None:
    """Pure torch: for every (k_cache, v_cache) in `caches` copy slot src[i]
    to slot dst[i] (gather all sources, then scatter). In place."""
    src, dst = _valid_pairs(src_slots, dst_slots)
    if src.numel() == 0:
        return
    index = {}  # (device, block size) -> (src block, src offset, dst block, dst offset)
    for pair in caches:
        for cache in pair:
            key = (cache.device, cache.shape[1])
            if key not in index:
                bs = cache.shape[1]
                s, d = src.to(cache.device), dst.to(cache.device)
                index[key] = (s // bs, s % bs, d // bs, d % bs)
            sb, so, db, do = index[key]
            cache[db, do] = cache[sb, so]  # the gather is a new tensor: sources read first


# ---------------------------------------------------------------------------
# Triton
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _compact_kv_kernel(
        base_ptr, off_ptr, src_ptr, dst_ptr, P,
        s_blk, s_off, s_h, s_d,
        HEAD_DIM: tl.constexpr, NUM_COLS: tl.constexpr, PAGE: tl.constexpr,
        BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, OFF_ALIGN: tl.constexpr,
    ):
        t = tl.program_id(0)  # which cache tensor (layer x {K, V})
        cb = tl.program_id(1)  # which chunk of the Hkv * D columns
        off = tl.load(off_ptr + t)  # element offset of this cache from base_ptr
        if OFF_ALIGN > 1:
            off = tl.multiple_of(off, OFF_ALIGN)
        cache = base_ptr + off
        cols = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = cols < NUM_COLS
        col_off = (cols // HEAD_DIM).to(tl.int64) * s_h + (cols % HEAD_DIM) * s_d
        offs_p = tl.arange(0, BLOCK_P)
        for p0 in range(0, P, BLOCK_P):
            pp = p0 + offs_p
            p_ok = pp < P
            src = tl.load(src_ptr + pp, mask=p_ok, other=-1).to(tl.int64)
            dst = tl.load(dst_ptr + pp, mask=p_ok, other=-1).to(tl.int64)
            ok = (src >= 0) & (dst >= 0)
            s_addr = (src // PAGE) * s_blk + (src % PAGE) * s_off
            d_addr = (dst // PAGE) * s_blk + (dst % PAGE) * s_off
            m = ok[:, None] & c_ok[None, :]
            x = tl.load(cache + s_addr[:, None] + col_off[None, :], mask=m)
            tl.debug_barrier()  # every source of the chunk is read ...
            tl.store(cache + d_addr[:, None] + col_off[None, :], x, mask=m)
            tl.debug_barrier()  # ... before, and the chunk stored before the next reads


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class KVPointerTable:
    """Launch groups for a fixed list of caches: per group of tensors sharing
    shape/strides/dtype, the index of its base tensor (in the flattened
    [k0, v0, k1, v1, ...] list) and a device int64 tensor of the element
    offsets of every member from that base. Holds no reference to the caches."""

    def __init__(self, caches):
        tensors = [c for pair in caches for c in pair]
        if not tensors:
            raise ValueError("no caches")
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(tensors):
            if c.dim() != 4:
                raise ValueError(f"caches must be [num_blocks, block_size, Hkv, D], got {tuple(c.shape)}")
            if c.element_size() not in _INT_OF_SIZE:
                raise ValueError(f"unsupported cache dtype {c.dtype}")
            key = (tuple(c.shape), tuple(c.stride()), c.dtype, c.device)
            groups.setdefault(key, []).append(i)
        self.groups = []
        for (_, _, _, device), members in groups.items():
            base = tensors[members[0]]
            esz = base.element_size()
            offs = []
            for i in members:
                diff = tensors[i].data_ptr() - base.data_ptr()
                if diff % esz:
                    raise ValueError("cache data pointers are not element aligned")
                offs.append(diff // esz)
            align = 16
            while align > 1 and any(o % align for o in offs):
                align //= 2
            table = torch.tensor(offs, dtype=torch.int64, device=device)
            self.groups.append((members[0], table, len(members), align))
        self.key = self._key(caches)

    @staticmethod
    def _key(caches):
        return tuple((c.data_ptr(), tuple(c.shape), tuple(c.stride()), c.dtype) for pair in caches for c in pair)


_TABLES: dict[tuple, KVPointerTable] = {}


def make_kv_pointer_table(caches) -> KVPointerTable:
    """The (memoized) launch table of `caches`. Build it before CUDA-graph
    capture: it copies the offsets to the device once."""
    key = KVPointerTable._key(caches)
    tab = _TABLES.get(key)
    if tab is None:
        dev = caches[0][0].device if caches else None
        if dev is not None and dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "compact_kv: the pointer table of these caches must be built before CUDA-graph "
                "capture (call make_kv_pointer_table(caches) or compact_kv once eagerly first)"
            )
        if len(_TABLES) > 64:
            _TABLES.clear()
        tab = KVPointerTable(caches)
        _TABLES[key] = tab
    return tab


def compact_kv(
    caches,
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    *,
    table: KVPointerTable | None = None,
    block_p: int | None = None,
    block_c: int | None = None,
    num_warps: int = 4,
) -> None:
    """Triton KV compaction (see the module docstring): every layer in one
    launch per (shape, strides, dtype) group. src/dst: 1-D int tensors on
    the caches' device (int64 or int32), -1 = skip. In place; no host sync."""
    if not HAS_TRITON:
        raise RuntimeError("compact_kv needs Triton; use compact_kv_reference")
    if src_slots.shape != dst_slots.shape or src_slots.dim() != 1:
        raise ValueError("src_slots and dst_slots must be 1-D of equal length")
    P = src_slots.shape[0]
    if P == 0:
        return
    if table is None:
        tab = make_kv_pointer_table(caches)
    else:
        tab = table
        if tab.key != KVPointerTable._key(caches):
            raise ValueError("compact_kv: `table` was built for other caches")
    src = src_slots if src_slots.is_contiguous() else src_slots.contiguous()
    dst = dst_slots if dst_slots.is_contiguous() else dst_slots.contiguous()
    tensors = [c for pair in caches for c in pair]
    for base_idx, offs, n_t, align in tab.groups:
        base = tensors[base_idx]
        int_dtype = _INT_OF_SIZE[base.element_size()]
        if base.dtype != int_dtype:
            base = base.view(int_dtype)
        nb, page, hkv, d = base.shape
        if base.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
                raise RuntimeError("compact_kv on CPU tensors needs TRITON_INTERPRET=1; use compact_kv_reference")
        cols = hkv * d
        bc = block_c or min(64 if P <= 128 else 32, 1 << (cols - 1).bit_length())
        cap = max(16, 16384 // bc)
        bp = block_p or min(cap, max(16, 1 << (P - 1).bit_length()))
        grid = (n_t, math.ceil(cols / bc))
        _compact_kv_kernel[grid](
            base, offs, src, dst, P,
            *base.stride(),
            HEAD_DIM=d, NUM_COLS=cols, PAGE=page,
            BLOCK_P=bp, BLOCK_C=bc, OFF_ALIGN=align,
            num_warps=num_warps, num_stages=1,
        )
