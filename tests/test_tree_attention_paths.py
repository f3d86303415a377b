"""The engine's tree-attention paths compute the kernels' function.

* the paged-KV layout probe decodes vLLM's real CPU backend layout (keys are
  stored transposed inside a block) into K/V views that read back exactly what
  the backend wrote, for bf16 and fp32;
* the batched torch path the engine runs on CPU equals the kernels' torch
  reference (and therefore the Triton kernel's tests) on random paged inputs,
  for all node rows or only the branch rows after a spine (first_col),
  leaving every other row untouched.
"""

import pytest
import torch

from vllm_bastion.core.step import spine_first
from vllm_bastion.core.tree import ancestor_mask, build_best_first_trees, topk_per_depth
from vllm_bastion.kernels import pack_ancestor_bits, tree_attention_reference
from vllm_bastion.kv_layout import KVLayoutError, _probe
from vllm_bastion.tree_attention import TreeAttentionStep


class _CPUBackendImpl:
    """vLLM's CPU_ATTN KV write (the exact code path of CPUAttentionBackendImpl)."""

    num_kv_heads, head_size = 2, 64

    def do_kv_cache_update(self, layer, key, value, kv_cache, slots):
        from vllm import _custom_ops as ops

        nb, nkv, bs, _ = kv_cache.size()
        kc, vc = kv_cache.view(nb, nkv, bs * 2, -1).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, kc, vc, slots, layer.isa,
                                       k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_probe_decodes_the_cpu_backend_layout(dtype):
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    class Layer:
        isa = _get_attn_isa(dtype, 32, 64, "auto")

    kv = torch.zeros(7, 2, 32, 128, dtype=dtype)  # [blocks, kv heads, block, 2 * head]
    layout = _probe(_CPUBackendImpl(), Layer, kv, 32, 7)
    k_view, v_view = layout.views(kv)
    assert k_view.shape == (7, 32, 2, 64)
    impl = _CPUBackendImpl()
    key, val = torch.randn(40, 2, 64).to(dtype), torch.randn(40, 2, 64).to(dtype)
    slots = torch.randperm(7 * 32)[:40]
    impl.do_kv_cache_update(Layer, key, val, kv, slots)
    assert torch.equal(k_view[slots // 32, slots % 32], key)
    assert torch.equal(v_view[slots // 32, slots % 32], val)


def test_probe_refuses_a_layout_it_cannot_decode():
    class Lossy(_CPUBackendImpl):  # drops every other slot: not a bijection
        def do_kv_cache_update(self, layer, key, value, kv_cache, slots):
            kv_cache.view(-1)[: key.numel() // 2] = 1.0

    with pytest.raises(KVLayoutError):
        _probe(Lossy(), None, torch.zeros(7, 2, 32, 128), 32, 7)


@pytest.mark.parametrize("spine_first_layout", [False, True])
def test_batched_torch_path_equals_kernel_reference(spine_first_layout):
    torch.manual_seed(0)
    T, Hq, Hkv, D, bs, nb = 70, 4, 2, 32, 16, 20
    logp, tok = topk_per_depth(torch.randn(3, 5, 50), 3)
    trees = build_best_first_trees(logp, tok, max_nodes=9, num_nodes=torch.tensor([9, 4, 7]))
    first = torch.ones(3, dtype=torch.long)
    if spine_first_layout:  # the backend computes the spine; only branch rows here
        trees, spine = spine_first(trees)
        first = 1 + spine
    bits = pack_ancestor_bits(ancestor_mask(trees))
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    kc, vc = torch.randn(nb, bs, Hkv, D), torch.randn(nb, bs, Hkv, D)
    block_table = torch.randperm(nb).view(4, 5).int()
    step = TreeAttentionStep(
        backend_rows=torch.zeros(0, dtype=torch.long), backend_metadata=None,
        tree_req=torch.tensor([0, 2, 3], dtype=torch.int32),
        row_start=torch.tensor([0, 25, 50], dtype=torch.int32),  # rows 10..24 etc: other requests
        first_col=first,
        num_nodes=trees.num_nodes.int(), prefix_len=torch.tensor([30, 0, 77], dtype=torch.int32),
        anc_bits=bits, max_nodes=9, block_size=bs, num_blocks=nb,
    )
    got = torch.full((T, Hq, D), float("nan"))
    want = got.clone()
    step.torch_plan(block_table).run(q, k, v, kc, vc, got, 0.2)
    tree_attention_reference(q, k, v, kc, vc, block_table, step.tree_req, step.row_start,
                             step.num_nodes, step.prefix_len, bits, 0.2, want, max_nodes=9,
                             first_col=first)
    written = ~torch.isnan(want[:, 0, 0])
    assert written.sum() == int((trees.num_nodes + 1 - first).sum())  # branch rows only
    if spine_first_layout:
        assert written.sum() < 9 + 4 + 7
    assert torch.equal(~torch.isnan(got[:, 0, 0]), written)
    torch.testing.assert_close(got[written], want[written], rtol=1e-5, atol=1e-5)


def test_row_span_finds_consecutive_rows_only():
    """The backend works on views of the rows when they are consecutive: one
    request's root and spine (spine first), whatever its branch rows."""
    from vllm_bastion.core.step import plan_step
    from vllm_bastion.tree_attention import row_span

    assert row_span(torch.arange(3, 9)) == (3, 9)
    assert row_span(torch.tensor([5])) == (5, 6)
    assert row_span(torch.zeros(0, dtype=torch.long)) is None
    assert row_span(torch.tensor([0, 1, 3, 4])) is None  # a gap
    assert row_span(torch.tensor([0, 2, 1, 3])) is None  # same ends and length, out of order
    torch.manual_seed(0)
    logp, toks = topk_per_depth(torch.randn(2, 6, 50), 3)
    trees, _ = spine_first(build_best_first_trees(logp, toks, max_nodes=8))
    n = trees.num_nodes
    one = plan_step(trees.truncate(torch.tensor([int(n[0]), 0])), torch.tensor([0, 1 + int(n[0])]),
                    torch.tensor([1 + int(n[0]), 0]), torch.tensor([7, 11]))  # request 1: nothing
    assert one.num_branch_rows > 0 and row_span(one.backend_rows) == (0, int(one.backend_rows.numel()))
    two = plan_step(trees, torch.tensor([0, 9]), 1 + n, torch.tensor([7, 11]))
    assert two.num_branch_rows > 0 and row_span(two.backend_rows) is None
