"""Tree attention, torch reference. Pure torch.

A tree node attends to the request's cached prefix and to its own ancestors
(and itself) inside the tree, never to siblings or cousins.
"""

from __future__ import annotations

import torch


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Batched attention with an explicit visibility mask (float32 math).

    Args:
        q: [R, n, Hq, d] queries; k, v: [R, m, Hkv, d] keys/values.
        allowed: [R, n, m] bool, query i of batch r may see key j.
        scale: softmax scale.

    Returns [R, n, Hq, d] in q's dtype: softmax(q k^T * scale) v over the
    allowed keys, GQA by grouping each kv head's Hq / Hkv query heads (no
    K/V copy per query head). A query that may see no key at all gets
    zeros. (Two batched matmuls in float32; torch's fused CPU attention
    takes a slow path for masked float32 with GQA.)
    """
    R, n, Hq, d = q.shape
    m, Hkv = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    g = Hq // Hkv
    qg = q.float().view(R, n, Hkv, g, d).permute(0, 2, 3, 1, 4).reshape(R, Hkv, g * n, d)
    s = torch.matmul(qg, k.float().permute(0, 2, 3, 1)) * scale  # [R, Hkv, g*n, m]
    vis = allowed[:, None, None].expand(R, Hkv, g, n, m).reshape(R, Hkv, g * n, m)
    s = s.masked_fill(~vis, float("-inf"))
    empty = ~allowed.any(dim=-1)  # [R, n]
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # rows that see nothing: zeros
    o = torch.matmul(p, v.float().permute(0, 2, 1, 3))  # [R, Hkv, g*n, d]
    o = o.view(R, Hkv, g, n, d).permute(0, 3, 1, 2, 4).reshape(R, n, Hq, d)
    if bool(empty.any()):
        o = o.masked_fill(empty[..., None, None], 0.0)
    return o.to(q.dtype)


def tree_attention_reference(
    q: torch.Tensor,
    k_prefix: torch.Tensor,
    v_prefix: torch.Tensor,
    k_tree: torch.Tensor,
    v_tree: torch.Tensor,
    allowed: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of the tree rows of one request.

    Args:
        q: [n, Hq, d] queries of the tree rows being computed.
        k_prefix, v_prefix: [c, Hkv, d] cached prefix (c may be 0).
        k_tree, v_tree: [m, Hkv, d] keys/values of the tree rows (e.g. the
            root and all nodes, m = n + 1).
        allowed: [n, m] bool, allowed[i, j]: query i may see tree row j
            (ancestor-or-self).
        scale: softmax scale.

    Returns [n, Hq, d] in q's dtype; the math is float32 (`masked_attention`).
    """
    n = q.shape[0]
    c = k_prefix.shape[0]
    m = k_tree.shape[0]
    if allowed.shape != (n, m):
        raise ValueError(f"allowed must be [{n}, {m}], got {tuple(allowed.shape)}")
    mask = torch.ones((n, c + m), dtype=torch.bool, device=q.device)
    mask[:, c:] = allowed
    k = torch.cat([k_prefix.to(k_tree.dtype), k_tree], 0)
    v = torch.cat([v_prefix.to(v_tree.dtype), v_tree], 0)
    return masked_attention(q[None], k[None], v[None], mask[None], scale)[0]
