"""Grammar pruning and per-node bitmasks of draft trees (structured_trees.py),
with a real xgrammar matcher (vLLM's own wrapper), against per-path references:
a node survives iff the grammar accepts its whole root path, and its row's mask
is the mask of a fresh matcher advanced along that path.
"""

import random

import pytest
import torch

from vllm_bastion.structured_trees import fill_tree_bitmask, prune_tree


@pytest.fixture(scope="module")
def grammar_factory(tmp_path_factory):
    import xgrammar as xgr
    from tiny_models import make_tokenizer
    from transformers import AutoTokenizer
    from vllm.v1.structured_output.backend_xgrammar import XgrammarGrammar

    d = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(d, 512)
    tok = AutoTokenizer.from_pretrained(d)
    V = len(tok)
    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tok, vocab_size=V))
    ctx = compiler.compile_regex(r"(ab|c)+(x|yz)[0-9]{1,2}")

    def make():
        m = xgr.GrammarMatcher(ctx, max_rollback_tokens=32)
        return XgrammarGrammar(vocab_size=V, matcher=m, ctx=ctx)

    ids = [i for i in (tok.convert_tokens_to_ids(t) for t in
                       ["a", "b", "c", "x", "y", "z", "1", "2", "ab", "q"]) if i is not None]
    return make, ids, V, xgr


def random_tree(rng, ids, n, valid_next=None):
    """A random tree over `ids`; with `valid_next(path)`, most nodes continue
    their parent's path validly (so that pruning keeps a real tree)."""
    parents, tokens, ps = [], [], {0: []}
    for i in range(1, n + 1):
        p = rng.randrange(0, i) if rng.random() < 0.6 else i - 1
        used = {tokens[j - 1] for j in range(1, i) if parents[j - 1] == p}
        choices = [t for t in ids if t not in used] or ids
        if valid_next is not None and (i == 1 or rng.random() < 0.85):
            choices = [t for t in valid_next(ps[p]) if t not in used] or choices
        parents.append(p)
        tokens.append(rng.choice(choices))
        ps[i] = ps[p] + [tokens[-1]]
    return tokens, parents


def paths(tokens, parents):
    out = {0: []}
    for i, (t, p) in enumerate(zip(tokens, parents), 1):
        out[i] = out[p] + [t]
    return out


def mask_after(make, prefix, path, xgr, V):
    g = make()
    assert g.accept_tokens("r", prefix + path)
    bm = xgr.allocate_token_bitmask(1, V)
    if g.is_terminated():
        bm.fill_(-1)
    else:
        g.fill_bitmask(bm, 0)
    return bm[0]


@pytest.mark.parametrize("seed", range(6))
def test_prune_keeps_exactly_the_grammar_valid_paths(grammar_factory, seed):
    make, ids, V, xgr = grammar_factory
    rng = random.Random(seed)
    prefix = [ids[2]] if seed % 2 else []  # committed "c" for odd seeds
    tokens, parents = random_tree(rng, ids, 24)
    g = make()
    assert g.accept_tokens("r", prefix)
    before = xgr.allocate_token_bitmask(1, V)
    g.fill_bitmask(before, 0)
    tree = prune_tree(g, "r", tokens, parents)
    after = xgr.allocate_token_bitmask(1, V)
    g.fill_bitmask(after, 0)
    assert torch.equal(before, after)  # the matcher ends where it began
    ps = paths(tokens, parents)
    want = []
    for i in range(1, len(tokens) + 1):
        ref = make()
        ref.accept_tokens("r", prefix)
        if ref.validate_tokens(ps[i]) == ps[i]:
            want.append(i)
    assert tree.kept == want
    kept_paths = paths(tree.tokens, tree.parents)
    assert [kept_paths[j] for j in range(1, len(tree.kept) + 1)] == [ps[i] for i in want]


@pytest.mark.parametrize("seed", range(6))
def test_tree_bitmask_rows_are_the_masks_after_each_nodes_path(grammar_factory, seed):
    make, ids, V, xgr = grammar_factory
    rng = random.Random(100 + seed)
    prefix = [ids[0], ids[1]]  # committed "ab"

    def valid_next(path):
        ok = []
        for t in ids:
            ref = make()
            ref.accept_tokens("r", prefix)
            if ref.validate_tokens(path + [t]) == path + [t]:
                ok.append(t)
        return ok

    g = make()
    g.accept_tokens("r", prefix)
    for _ in range(20):  # a tree with enough grammar-valid nodes
        tokens, parents = random_tree(rng, ids, 24, valid_next)
        tree = prune_tree(g, "r", tokens, parents)
        if len(tree.tokens) >= 8:
            break
    n = len(tree.tokens)
    bm = xgr.allocate_token_bitmask(n + 3, V)
    fill_tree_bitmask(g, "r", bm, 2, tree.tokens, tree.parents, torch.tensor(-1, dtype=torch.int32))
    ps = paths(tree.tokens, tree.parents)
    assert n >= 8
    for i in range(n + 1):
        assert torch.equal(bm[2 + i], mask_after(make, prefix, ps[i], xgr, V)), i

