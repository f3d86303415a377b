"""Tree attention, torch reference. Pure torch.

A tree node attends to the request's cached prefix and to its own ancestors
(and itself) inside the tree, never to siblings or cousins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Batched attention with an explicit visibility mask (float32 math).

    Args:
        q: [R, n, Hq, d] queries; k, v: [R, m, Hkv, d] keys/values.
        allowed: [R, n, m] bool, query i of batch r may see key j.
        scale: softmax scale.

    Returns [R, n, Hq, d] in q's dtype. GQA: Hq must be a multiple of Hkv.
    A query that may see no key at all gets zeros. (torch's fused
    scaled_dot_product_attention in float32: softmax(q k^T * scale) v.)
    """
    R, n, Hq, d = q.shape
    Hkv = k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    empty = ~allowed.any(dim=-1)  # [R, n]
    has_empty = bool(empty.any())
    if has_empty:
        allowed = allowed | empty[..., None]
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=allowed[:, None], scale=scale, enable_gqa=Hq != Hkv,
    ).transpose(1, 2)
    if has_empty:
        out = out.masked_fill(empty[..., None, None], 0.0)
    return out.to(q.dtype)


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
