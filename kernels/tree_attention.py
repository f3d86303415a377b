"""Tree attention over vLLM's paged KV cache: a Triton kernel and its torch reference.

In one verify step the target model processes a flattened batch of T rows.
A *tree request* r owns rows [row_start[r], row_start[r] + 1 + num_nodes[r]):
its root (tree column 0, the last verified token) and then its draft nodes
(tree columns 1..n) in an order where every node's parent has a smaller
column (BASTION sends them spine first, see vllm_bastion/core/step.py). This
module computes attention for the node rows only, optionally starting at
column first_col[r] (the columns before it, a causal spine, are the
attention backend's):

    node column i (1 <= i <= n) of request r attends to
      * every cached prefix token p < prefix_len[r], read from the paged cache
        k_cache[block_table[tree_req[r], p // bs], p % bs]   (bs = block size),
      * every tree column j <= i whose bit is set in anc_bits[r, i]
        (the ancestors of i, the root and i itself), read from the step's
        dense k/v rows row_start[r] + j.

and writes out[row_start[r] + i] for i = first_col[r]..n (default 1..n). Nothing else in `out` is
touched: root rows, prefill chunks, plain decodes and padding keep whatever
the backend wrote there.

Conventions shared by the kernel and the reference (they compute the same
function, the reference in float32):

  * q [T, Hq, D], k/v [T, Hkv, D], out [T, Hq, D]: any strides. GQA: query
    head h reads kv head h // (Hq // Hkv).
  * k_cache / v_cache [num_blocks, block_size, Hkv, D]: any strides (e.g.
    kv_cache[0] / kv_cache[1] of vLLM's FlashAttention layout, or a permuted
    HND view). fp16/bf16/fp32, or float8_e4m3fn / float8_e5m2 (vLLM keeps fp8
    caches as uint8: pass `.view(torch.float8_e4m3fn)`); an fp8 cache is
    dequantized on load as value * k_scale (v_scale). Scales are ignored for
    non-fp8 caches, as in vLLM. A scale may be a float or a 1-element device
    tensor (vLLM's layer._k_scale; a tensor keeps CUDA graphs replayable when
    the scale changes).
  * anc_bits [R, W, ceil(W/32)] int32 (`pack_ancestor_bits`): bit j % 32 of
    word j // 32 of row i says column j is visible from column i. Row 0 (the
    root) is not used. Bits with j > i are ignored (ancestors always precede
    a node in best-first order); bits of columns > n are never reached.
  * A node row that sees nothing (no prefix and no bit set) gets zeros.
  * max_nodes (int, default W - 1): nodes with index >= max_nodes
    (column > max_nodes) are not computed. The kernel's grid is sized from it
    so that no host synchronization is needed to read num_nodes; keep it a
    fixed bound (the tree budget) so a captured CUDA graph stays valid.

CUDA-graph safety of `tree_attention`: every per-step quantity (tree_req,
row_start, num_nodes, prefix_len, anc_bits, block_table, scales) is read on
the device; the launch grid depends only on tensor shapes and on the Python
ints max_nodes / num_splits; programs whose node block lies past num_nodes[r]
exit immediately (pad R with num_nodes = 0 entries). With num_splits == 1
nothing is allocated; with num_splits > 1 pass a preallocated `workspace`
(`tree_attention_workspace`), otherwise one is allocated per call (legal
under capture with PyTorch's caching allocator, but not allocation-free).
"""

from __future__ import annotations

import math

import torch

from vllm_bastion.core.attention import tree_attention_reference as _core_tree_attention

try:  # the torch references must work without Triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised by a subprocess test
    triton = None
    tl = None
    HAS_TRITON = False

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, n)
)

__all__ = [
    "HAS_TRITON",
    "ancestor_mask",
    "pack_ancestor_bits",
    "unpack_ancestor_bits",
    "tree_attention_reference",
    "tree_attention",
    "tree_attention_workspace",
    "suggest_num_splits",
]


# ---------------------------------------------------------------------------
# ancestor bitmasks
# ---------------------------------------------------------------------------


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[W] parent column of every tree column (parents[0] = -1 for the root,
    parents[i] < i) -> [W, W] bool, [i, j] = j is i or an ancestor of i."""
    W = parents.shape[0]
    allowed = torch.zeros(W, W, dtype=torch.bool)
    par = parents.tolist()
    for i in range(W):
        j = i
        while j >= 0:
            allowed[i, j] = True
            j = par[j] if j > 0 else -1
    return allowed.to(parents.device)


def pack_ancestor_bits(allowed: torch.Tensor) -> torch.Tensor:
    """bool [R, W, W] (or [W, W]) -> int32 [R, W, ceil(W/32)].

    Bit j % 32 of word j // 32 in row i is set iff allowed[..., i, j].
    Words are int32 (two's complement, bit 31 is the sign bit)."""
    squeeze = allowed.dim() == 2
    if squeeze:
        allowed = allowed.unsqueeze(0)
    R, W, Wc = allowed.shape
    words = max(1, (Wc + 31) // 32)
    a = torch.zeros(R, W, words * 32, dtype=torch.int64, device=allowed.device)
    a[:, :, :Wc] = allowed.to(torch.int64)
    weights = torch.bitwise_left_shift(
        torch.ones(32, dtype=torch.int64, device=allowed.device),
        torch.arange(32, dtype=torch.int64, device=allowed.device),
    )
    packed = (a.view(R, W, words, 32) * weights).sum(-1)  # [0, 2^32)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
    return packed[0] if squeeze else packed


def unpack_ancestor_bits(bits: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """Inverse of `pack_ancestor_bits`: int32 [..., W, words] -> bool [..., W, width]
    (width defaults to W)."""
    W, words = bits.shape[-2], bits.shape[-1]
    width = W if width is None else width
    shifts = torch.arange(32, dtype=torch.int64, device=bits.device)
    b = torch.bitwise_right_shift(bits.to(torch.int64).unsqueeze(-1), shifts) & 1
    return b.reshape(*bits.shape[:-1], words * 32)[..., :width].bool()


# ---------------------------------------------------------------------------
# torch reference
# ---------------------------------------------------------------------------


def _scale_value(s) -> float:
    if isinstance(s, torch.Tensor):
        return float(s.reshape(-1)[0].item())
    return float(s)


def tree_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    tree_req: torch.Tensor,
    row_start: torch.Tensor,
    num_nodes: torch.Tensor,
    prefix_len: torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    k_scale=1.0,
    v_scale=1.0,
    max_nodes: int | None = None,
    first_col: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch tree attention (float32 math); writes the node rows of `out`
    in place and returns `out`. Same semantics as `tree_attention` (see the
    module docstring). Synchronizes with the device; for tests and CPU."""
    R = tree_req.shape[0]
    if R == 0:
        return out
    W = anc_bits.shape[1]
    max_nodes = W - 1 if max_nodes is None else int(max_nodes)
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    bs = k_cache.shape[1]
    fp8 = k_cache.dtype in FP8_DTYPES
    ks = _scale_value(k_scale) if fp8 else 1.0
    vs = _scale_value(v_scale) if fp8 else 1.0
    tree_req_l = tree_req.tolist()
    row_start_l = row_start.tolist()
    num_nodes_l = num_nodes.tolist()
    prefix_l = prefix_len.tolist()
    first_l = [1] * R if first_col is None else first_col.tolist()
    for r in range(R):
        n = min(int(num_nodes_l[r]), max_nodes)
        if n <= 0:
            continue
        rs, c, req = int(row_start_l[r]), int(prefix_l[r]), int(tree_req_l[r])
        pos = torch.arange(c, device=k_cache.device)
        blk = block_table[req, pos // bs].long()
        off = pos % bs
        kp = k_cache[blk, off].float() * ks  # [c, Hkv, D]
        vp = v_cache[blk, off].float() * vs
        vis = unpack_ancestor_bits(anc_bits[r, 1 : n + 1], n + 1).to(q.device)  # [n, n+1]
        vis &= torch.ones(n, n + 1, dtype=torch.bool, device=q.device).tril(1)
        f = max(1, int(first_l[r]))
        if f > n:
            continue
        o = _core_tree_attention(
            q[rs + f : rs + 1 + n], kp.to(q.device), vp.to(q.device),
            k[rs : rs + n + 1].float(), v[rs : rs + n + 1].float(), vis[f - 1 :], scale,
        )
        out[rs + f : rs + 1 + n] = o.to(out.dtype)
    return out


# ---------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------

if HAS_TRITON:

    @triton.jit
    def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST: Triton's interpreter multiplies bfloat16 tiles as their raw
        # uint16 bits; there the bf16-rounded operands are multiplied in fp32
        # instead (exactly what the GPU's bf16 MMA with fp32 accumulate does).
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _tree_attn_fwd(
        q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, bt_ptr,
        tree_req_ptr, row_start_ptr, num_nodes_ptr, prefix_len_ptr, anc_ptr, first_col_ptr,
        out_ptr, ws_o_ptr, ws_ml_ptr,
        k_scale, v_scale, qk_scale,
        num_tree_reqs, max_nodes, num_qblocks,
        sq_t, sq_h, sq_d, sk_t, sk_h, sk_d, sv_t, sv_h, sv_d,
        skc_b, skc_s, skc_h, skc_d, svc_b, svc_s, svc_h, svc_d,
        sbt_r, sbt_b, sa_r, sa_i, sa_w, so_t, so_h, so_d,
        G: tl.constexpr, HQ: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr,
        PAGE: tl.constexpr, NUM_SPLITS: tl.constexpr,
        KV_FP8: tl.constexpr, SCALE_IS_PTR: tl.constexpr, DOT_PREC: tl.constexpr,
        UPCAST_DOT: tl.constexpr, HAS_FIRST: tl.constexpr,
    ):
        # grid: (tree request x node block, kv head, prefix split)
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        split = tl.program_id(2)
        r = pid // num_qblocks
        qb = pid % num_qblocks
        n = tl.minimum(tl.load(num_nodes_ptr + r), max_nodes)
        i0 = qb * BLOCK_Q
        if i0 >= n:
            return
        if HAS_FIRST:  # nodes before first_col - 1 (the spine) are not computed
            n0 = tl.load(first_col_ptr + r).to(tl.int32) - 1
        else:
            n0 = 0
        if i0 + BLOCK_Q <= n0:
            return
        req = tl.load(tree_req_ptr + r).to(tl.int64)
        rs = tl.load(row_start_ptr + r).to(tl.int64)
        plen = tl.load(prefix_len_ptr + r)

        # query tile: BLOCK_M rows = BLOCK_Q nodes x G query heads of kv head kvh
        offs_m = tl.arange(0, BLOCK_M)
        node_local = offs_m // G
        head = kvh * G + offs_m % G
        node = i0 + node_local
        row_ok = (node_local < BLOCK_Q) & (node < n) & (node >= n0)
        col = node + 1  # tree column of the query row
        qrow = rs + col
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        q = tl.load(
            q_ptr + qrow[:, None] * sq_t + head[:, None] * sq_h + offs_d[None, :] * sq_d,
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        if KV_FP8:
            if SCALE_IS_PTR:
                ks = tl.load(k_scale).to(tl.float32)
                vs = tl.load(v_scale).to(tl.float32)
            else:
                ks = k_scale
                vs = v_scale

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

        # ---- phase 1: this split's share of the cached prefix (paged) ----
        if NUM_SPLITS == 1:
            lo = 0
            hi = plen
        else:
            per = tl.cdiv(tl.cdiv(plen, NUM_SPLITS), TILE_N) * TILE_N
            lo = split * per
            hi = tl.minimum(plen, lo + per)
        offs_n = tl.arange(0, TILE_N)
        kc_base = kc_ptr + kvh * skc_h
        vc_base = vc_ptr + kvh * svc_h
        for start in range(lo, hi, TILE_N):
            pos = start + offs_n
            p_ok = pos < hi
            blk = tl.load(bt_ptr + req * sbt_r + (pos // PAGE) * sbt_b, mask=p_ok, other=0).to(tl.int64)
            inblk = pos % PAGE
            kt = tl.load(
                kc_base + (blk * skc_b + inblk * skc_s)[None, :] + offs_d[:, None] * skc_d,
                mask=d_ok[:, None] & p_ok[None, :],
                other=0.0,
            )
            if KV_FP8:
                kt = (kt.to(tl.float32) * ks).to(q.dtype)
            else:
                kt = kt.to(q.dtype)
            s = _dot(q, kt, DOT_PREC, UPCAST_DOT) * qk_scale
            s = tl.where(p_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                vc_base + (blk * svc_b + inblk * svc_s)[:, None] + offs_d[None, :] * svc_d,
                mask=p_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            if KV_FP8:
                vt = (vt.to(tl.float32) * vs).to(q.dtype)
            else:
                vt = vt.to(q.dtype)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_PREC, UPCAST_DOT)
            m_i = m_new

        # ---- phase 2 (split 0 only): tree columns 0..min(n, last node of block) ----
        tree_hi = tl.where(split == 0, tl.minimum(n, i0 + BLOCK_Q) + 1, 0)
        offs_t = tl.arange(0, 32)
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h
        anc_row = anc_ptr + r * sa_r + col * sa_i
        for j0 in range(0, tree_hi, 32):
            cols = j0 + offs_t
            c_ok = cols < tree_hi
            krow = rs + cols
            kt = tl.load(
                k_base + krow[None, :] * sk_t + offs_d[:, None] * sk_d,
                mask=d_ok[:, None] & c_ok[None, :],
                other=0.0,
            ).to(q.dtype)
            word = tl.load(anc_row + (j0 // 32) * sa_w, mask=row_ok, other=0)
            bit = (word[:, None] >> offs_t[None, :]) & 1
            vis = (bit != 0) & (cols[None, :] <= col[:, None]) & c_ok[None, :]
            s = _dot(q, kt, DOT_PREC, UPCAST_DOT) * qk_scale
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            vt = tl.load(
                v_base + krow[:, None] * sv_t + offs_d[None, :] * sv_d,
                mask=c_ok[:, None] & d_ok[None, :],
                other=0.0,
            ).to(q.dtype)
            acc = acc * alpha[:, None] + _dot(p.to(vt.dtype), vt, DOT_PREC, UPCAST_DOT)
            m_i = m_new

        if NUM_SPLITS == 1:
            l_safe = tl.where(l_i == 0.0, 1.0, l_i)
            o = acc / l_safe[:, None]
            tl.store(
                out_ptr + qrow[:, None] * so_t + head[:, None] * so_h + offs_d[None, :] * so_d,
                o.to(out_ptr.dtype.element_ty),
                mask=row_ok[:, None] & d_ok[None, :],
            )
        else:
            # partial (unnormalized acc, running max in log2 units, denominator)
            widx = ((split * num_tree_reqs + r).to(tl.int64) * max_nodes + node) * HQ + head
            tl.store(
                ws_o_ptr + widx[:, None] * HEAD_DIM + offs_d[None, :],
                acc,
                mask=row_ok[:, None] & d_ok[None, :],
            )
            tl.store(ws_ml_ptr + widx * 2, m_i, mask=row_ok)
            tl.store(ws_ml_ptr + widx * 2 + 1, l_i, mask=row_ok)

    @triton.jit
    def _tree_attn_combine(
        out_ptr, ws_o_ptr, ws_ml_ptr, row_start_ptr, num_nodes_ptr, first_col_ptr,
        num_tree_reqs, max_nodes, so_t, so_h, so_d,
        HQ: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr, HAS_FIRST: tl.constexpr,
    ):
        # grid: (tree request x node, query head)
        pid = tl.program_id(0)
        h = tl.program_id(1)
        r = pid // max_nodes
        node = pid % max_nodes
        n = tl.load(num_nodes_ptr + r)
        if node >= n:
            return
        if HAS_FIRST:
            n0 = tl.load(first_col_ptr + r).to(tl.int32) - 1
        else:
            n0 = 0
        if node < n0:
            return
        rs = tl.load(row_start_ptr + r).to(tl.int64)
        offs_s = tl.arange(0, S_PAD)
        s_ok = offs_s < NUM_SPLITS
        widx = ((offs_s * num_tree_reqs + r).to(tl.int64) * max_nodes + node) * HQ + h
        m = tl.load(ws_ml_ptr + widx * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(ws_ml_ptr + widx * 2 + 1, mask=s_ok, other=0.0)
        mx = tl.max(m, 0)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        w = tl.exp2(m - mx)
        den = tl.sum(w * l, 0)
        den = tl.where(den == 0.0, 1.0, den)
        offs_d = tl.arange(0, D_PAD)
        d_ok = offs_d < HEAD_DIM
        acc = tl.load(
            ws_o_ptr + widx[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        o = tl.sum(acc * w[:, None], 0) / den
        tl.store(
            out_ptr + (rs + 1 + node) * so_t + h * so_h + offs_d * so_d,
            o.to(out_ptr.dtype.element_ty),
            mask=d_ok,
        )


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def tree_attention_workspace(
    num_splits: int, num_tree_reqs: int, max_nodes: int, num_q_heads: int, head_dim: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Preallocated scratch for `tree_attention(..., num_splits > 1)`:
    (partial outputs [S, R, max_nodes, Hq, D], max/denominator [S, R, max_nodes, Hq, 2]), float32."""
    o = torch.empty(num_splits, num_tree_reqs, max_nodes, num_q_heads, head_dim, dtype=torch.float32, device=device)
    ml = torch.empty(num_splits, num_tree_reqs, max_nodes, num_q_heads, 2, dtype=torch.float32, device=device)
    return o, ml


def suggest_num_splits(
    num_tree_reqs: int,
    max_nodes: int,
    num_q_heads: int,
    num_kv_heads: int,
    max_prefix_len: int,
    num_sms: int = 132,
    block_m: int | None = None,
) -> int:
    """Host-side heuristic (no device access): split the prefix when the
    (request x node block x kv head) grid is too small to fill the GPU and the
    prefix is long. Use a fixed value per CUDA graph."""
    g = num_q_heads // num_kv_heads
    bm, bq, _, _ = _block_config(g, max_nodes, 128, block_m, None)
    progs = num_tree_reqs * math.ceil(max(1, max_nodes) / bq) * num_kv_heads
    if max_prefix_len < 1024 or progs >= num_sms:
        return 1
    s = min(math.ceil(2 * num_sms / progs), max_prefix_len // 512, 32)
    return max(1, s)


def _block_config(g: int, max_nodes: int, d_pad: int, block_m, tile_n):
    if block_m is None:
        if g > 64:
            block_m = _next_pow2(g)
        elif g * max(1, max_nodes) >= 2048:
            block_m = 128
        else:
            block_m = min(64, max(16, _next_pow2(g * max(1, max_nodes))))
    if block_m < g or block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m} must be a power of two >= max(16, GQA ratio {g})")
    block_q = block_m // g
    if tile_n is None:
        tile_n = 64 if d_pad <= 64 or block_m <= 64 else 32
    num_warps = 8 if block_m >= 128 else 4
    return block_m, block_q, tile_n, num_warps


def tree_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    tree_req: torch.Tensor,
    row_start: torch.Tensor,
    num_nodes: torch.Tensor,
    prefix_len: torch.Tensor,
    anc_bits: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    k_scale=1.0,
    v_scale=1.0,
    max_nodes: int | None = None,
    *,
    num_splits: int = 1,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_m: int | None = None,
    tile_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    first_col: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton tree attention: writes the node rows of `out` in place (one
    launch, or two with num_splits > 1) and returns `out`.

    Arguments as in the module docstring; in addition:
      max_nodes: static bound on num_nodes (default anc_bits.shape[1] - 1);
        sizes the grid, nodes beyond it are not computed.
      num_splits: split every prefix into this many chunks processed by
        separate programs (flash-decoding), merged by a second kernel; use it
        when R * ceil(max_nodes / BLOCK_Q) * Hkv is small and prefixes are
        long (`suggest_num_splits`).
      workspace: `tree_attention_workspace(num_splits, R, max_nodes, Hq, D)`
        (only read when num_splits > 1).
      block_m / tile_n / num_warps / num_stages: tuning overrides.
      first_col: optional [R] int, the first tree column to compute per
        request (columns 1..first_col-1, e.g. a spine the attention backend
        already computed causally, are left untouched). Default 1.
    """
    if not HAS_TRITON:
        raise RuntimeError("tree_attention needs Triton; use tree_attention_reference")
    if q.device.type == "cpu" and not _interpreting():
        raise RuntimeError(
            "tree_attention on CPU tensors needs TRITON_INTERPRET=1 set before this module is "
            "imported; use tree_attention_reference otherwise"
        )
    R = tree_req.shape[0]
    T, Hq, D = q.shape
    Hkv = k.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    if k.shape != (T, Hkv, D) or v.shape != (T, Hkv, D):
        raise ValueError("k and v must be [T, Hkv, D] like q")
    if k_cache.dim() != 4 or k_cache.shape[2:] != (Hkv, D) or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must be [num_blocks, block_size, {Hkv}, {D}]")
    if k_cache.dtype == torch.uint8:
        raise ValueError("uint8 KV cache: pass it viewed as its fp8 dtype (e.g. .view(torch.float8_e4m3fn))")
    g = Hq // Hkv
    W = anc_bits.shape[1]
    max_nodes = W - 1 if max_nodes is None else int(max_nodes)
    if max_nodes > W - 1 or anc_bits.shape[2] * 32 < max_nodes + 1:
        raise ValueError(f"anc_bits {tuple(anc_bits.shape)} too small for max_nodes={max_nodes}")
    if R == 0 or max_nodes <= 0:
        return out
    num_splits = max(1, int(num_splits))
    d_pad = max(16, _next_pow2(D))
    bm, bq, tn, nw = _block_config(g, max_nodes, d_pad, block_m, tile_n)
    if num_warps is not None:
        nw = num_warps
    fp8 = k_cache.dtype in FP8_DTYPES
    if fp8 and q.dtype in FP8_DTYPES:
        raise ValueError("fp8 queries are not supported")
    scale_is_ptr = isinstance(k_scale, torch.Tensor)
    if scale_is_ptr != isinstance(v_scale, torch.Tensor):
        raise ValueError("k_scale and v_scale must both be floats or both tensors")
    if not fp8:  # scales are ignored for non-fp8 caches
        k_scale = v_scale = 1.0
        scale_is_ptr = False
    dot_prec = "ieee" if q.dtype == torch.float32 else None
    if num_splits > 1:
        if workspace is None:
            workspace = tree_attention_workspace(num_splits, R, max_nodes, Hq, D, q.device)
        ws_o, ws_ml = workspace
        if ws_o.shape != (num_splits, R, max_nodes, Hq, D) or ws_ml.shape != (num_splits, R, max_nodes, Hq, 2):
            raise ValueError("workspace does not match (num_splits, R, max_nodes, Hq, D)")
        if not (ws_o.is_contiguous() and ws_ml.is_contiguous()) or ws_o.dtype != torch.float32:
            raise ValueError("workspace must be contiguous float32")
    else:
        ws_o = ws_ml = out  # unused
    nqb = triton.cdiv(max_nodes, bq)
    grid = (R * nqb, Hkv, num_splits)
    extra = {"num_warps": nw}
    if num_stages is not None:
        extra["num_stages"] = num_stages
    _tree_attn_fwd[grid](
        q, k, v, k_cache, v_cache, block_table,
        tree_req, row_start, num_nodes, prefix_len, anc_bits,
        first_col if first_col is not None else num_nodes,
        out, ws_o, ws_ml,
        k_scale if scale_is_ptr else float(k_scale),
        v_scale if scale_is_ptr else float(v_scale),
        float(scale) * 1.4426950408889634,
        R, max_nodes, nqb,
        *q.stride(), *k.stride(), *v.stride(),
        *k_cache.stride(), *v_cache.stride(),
        *block_table.stride(), *anc_bits.stride(), *out.stride(),
        G=g, HQ=Hq, HEAD_DIM=D, D_PAD=d_pad,
        BLOCK_M=bm, BLOCK_Q=bq, TILE_N=tn,
        PAGE=k_cache.shape[1], NUM_SPLITS=num_splits,
        KV_FP8=fp8, SCALE_IS_PTR=scale_is_ptr, DOT_PREC=dot_prec,
        UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
        HAS_FIRST=first_col is not None,
        **extra,
    )
    if num_splits > 1:
        _tree_attn_combine[(R * max_nodes, Hq)](
            out, ws_o, ws_ml, row_start, num_nodes,
            first_col if first_col is not None else num_nodes,
            R, max_nodes, *out.stride(),
            HQ=Hq, HEAD_DIM=D, D_PAD=_next_pow2(D),
            NUM_SPLITS=num_splits, S_PAD=max(2, _next_pow2(num_splits)),
            HAS_FIRST=first_col is not None,
            num_warps=4,
        )
    return out
