"""Structured outputs (JSON schema, regex, grammar, choice) on draft trees.

In vLLM the grammar lives in the scheduler process (StructuredOutputManager):
it validates a request's drafts before scheduling them (`validate_tokens`,
the longest grammar-valid prefix of a chain) and fills one token bitmask per
verified row (`grammar_bitmask`, advancing the matcher along the chain); the
worker only applies the masks to the logits. BASTION's drafts are a tree, so
both steps walk the tree instead (depth first, advancing the matcher into a
node and rolling it back on the way out):

  * pruning (`update_draft_token_ids`): a node whose token the grammar
    rejects after the node's own path, and its whole subtree, is dropped
    before scheduling, so it costs no verify row;
  * masks (`grammar_bitmask`): the row of every node gets the mask of the
    grammar state after the node's own path (the root's: after the committed
    tokens), so the target's choice at every node is the one autoregressive
    constrained decoding would make there.

Side channels (both plain attributes on vLLM's own messages, which pickle
them across processes):
  * worker -> scheduler: `DraftTokenIds.<PARENTS_ATTR>` = {req_id: parents},
    the tree shape of each structured-output request's drafts (parents[i] is
    the parent of node i + 1; 0 = root), set by the runner;
  * scheduler -> worker: `SchedulerOutput.<KEPT_ATTR>` = {req_id: kept},
    which of the drafted nodes (1-based, in draft order) survived pruning, for
    the scheduled prefix; the runner restricts its pending tree to them.

While a request with a reasoning parser is still reasoning (the grammar
starts only after the reasoning end, wherever that falls on each path),
its tree is cut to the spine (a chain) and vLLM's own chain code runs
unchanged; a warning is logged once. Every other request keeps its tree.

Grammar matchers advance one token at a time, so this walks nodes in Python
(as vLLM's chain code walks draft tokens); it runs in the scheduler process,
overlapped with the worker's forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vllm.logger import init_logger

logger = init_logger("vllm.bastion")

PARENTS_ATTR = "bastion_tree_parents"
KEPT_ATTR = "bastion_kept_nodes"
_TREE_ATTR = "_bastion_tree"  # on vLLM's Request (scheduler side)
_warned = {"reasoning": False, "rejected": False}


@dataclass
class ScheduledTree:
    """A structured-output request's pruned draft tree (scheduler side)."""

    tokens: list[int]  # kept drafts, in draft order
    parents: list[int]  # parent of each kept node among the kept (0 = root, j = kept node j)
    kept: list[int]  # original 1-based index of each kept node


def _children(parents: list[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents, 1):
        kids[p].append(i)
    return kids


def _walk(grammar, tokens: list[int], parents: list[int], enter) -> list[list[int]]:
    """Depth-first over the tree with the request's matcher: `enter(i, tok)`
    is called for node i with the matcher after i's parent's path and
    returns True when it advanced the matcher into i (then i's subtree is
    visited and the matcher rolled back out of i afterwards). The matcher
    ends where it began. Returns the children lists."""
    kids = _children(parents)
    stack = [(c, False) for c in reversed(kids[0])]
    while stack:
        i, leaving = stack.pop()
        if leaving:
            grammar.rollback(1)
        elif enter(i, tokens[i - 1]):
            stack.append((i, True))
            stack.extend((c, False) for c in reversed(kids[i]))
    return kids


def prune_tree(grammar, req_id: str, tokens: list[int], parents: list[int]) -> ScheduledTree:
    """Keep the nodes the grammar accepts after their own path (and nothing
    below a rejected or terminating node). The matcher ends where it began."""
    keep = [False] * (len(tokens) + 1)

    def enter(i, tok):
        if grammar.is_terminated() or grammar.validate_tokens([tok]) != [tok]:
            return False
        grammar.accept_tokens(req_id, [tok])
        keep[i] = True
        return True

    _walk(grammar, tokens, parents, enter)
    kept = [i for i in range(1, len(tokens) + 1) if keep[i]]
    new = {old: j for j, old in enumerate(kept, 1)}
    return ScheduledTree([tokens[i - 1] for i in kept],
                         [new.get(parents[i - 1], 0) for i in kept], kept)


def fill_tree_bitmask(grammar, req_id: str, bitmask, base: int, tokens: list[int],
                      parents: list[int], full_mask) -> None:
    """Rows base .. base + len(tokens): the mask after the root (committed
    tokens) and after every node's own path, depth first."""

    def fill(row):
        if grammar.is_terminated():
            bitmask[row].fill_(full_mask)
        else:
            grammar.fill_bitmask(bitmask, row)

    rejected = []

    def enter(i, tok):
        if grammar.is_terminated() or not grammar.accept_tokens(req_id, [tok]):
            rejected.append(i)
            return False
        fill(base + i)
        return True

    fill(base)
    kids = _walk(grammar, tokens, parents, enter)
    for i in rejected:
        # cannot happen after pruning; never accepted anyway (the parent's
        # mask forbids its token): its subtree reuses the parent's mask
        if not _warned["rejected"]:
            _warned["rejected"] = True
            logger.warning("BASTION: grammar rejected a pruned draft node of request %s", req_id)
        src = base + parents[i - 1]
        sub = [i]
        for j in sub:
            bitmask[base + j].copy_(bitmask[src])
            sub.extend(kids[j])


def _reasoning(manager, request) -> bool:
    """The grammar does not constrain from the request's next token on yet."""
    return tuple(manager._get_constraint_bounds(request, ())) != (0, 0)


def _spine(parents: list[int]) -> int:
    """Length of the leading chain of a spine-first node list."""
    n = 0
    while n < len(parents) and parents[n] == n:
        n += 1
    return n


# ----------------------------------------------------------------- scheduler patches


def update_draft_token_ids(orig, scheduler, draft_token_ids) -> None:
    """Scheduler.update_draft_token_ids with the trees of structured-output
    requests pruned by their grammar (vLLM validates chains)."""
    trees = getattr(draft_token_ids, PARENTS_ATTR, None)
    if not trees:
        return orig(scheduler, draft_token_ids)
    manager = scheduler.structured_output_manager
    for req_id, spec in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
        request = scheduler.requests.get(req_id)
        if request is None or request.is_finished():
            continue
        setattr(request, _TREE_ATTR, None)
        if request.is_prefill_chunk:
            if request.spec_token_ids:
                request.spec_token_ids = []
            continue
        parents = trees.get(req_id)
        if parents is None or not request.use_structured_output or not spec:
            request.spec_token_ids = manager.validate_tokens(request, spec)
            continue
        parents = list(parents[: len(spec)])
        if _reasoning(manager, request):
            if not _warned["reasoning"]:
                _warned["reasoning"] = True
                logger.warning(
                    "BASTION: structured-output requests still in their reasoning section "
                    "draft a chain (the tree's spine) until the reasoning ends; their trees "
                    "resume after it.")
            spine = _spine(parents)
            request.spec_token_ids = manager.validate_tokens(request, list(spec[:spine]))
            setattr(request, _TREE_ATTR, ScheduledTree(
                list(request.spec_token_ids), list(range(len(request.spec_token_ids))),
                list(range(1, len(request.spec_token_ids) + 1))))
            continue
        grammar = request.structured_output_request.grammar
        tree = prune_tree(grammar, req_id, list(spec), parents)
        request.spec_token_ids = list(tree.tokens)
        setattr(request, _TREE_ATTR, tree)


def schedule(orig, scheduler, *args, **kwargs):
    """Scheduler.schedule, plus which drafted nodes of each pruned tree the
    scheduled drafts are (for the worker)."""
    out = orig(scheduler, *args, **kwargs)
    kept = {}
    for req_id, toks in out.scheduled_spec_decode_tokens.items():
        request = scheduler.requests.get(req_id)
        tree = getattr(request, _TREE_ATTR, None) if request is not None else None
        if tree is not None and toks:
            kept[req_id] = tree.kept[: len(toks)]
    if kept:
        setattr(out, KEPT_ATTR, kept)
    return out


def grammar_bitmask(orig, manager, requests, structured_output_request_ids,
                    scheduled_spec_decode_tokens):
    """StructuredOutputManager.grammar_bitmask with one row per tree node,
    each the mask after the node's own path (vLLM: after a chain prefix)."""
    trees = {}
    for req_id in structured_output_request_ids:
        request = requests[req_id]
        tree = getattr(request, _TREE_ATTR, None)
        toks = scheduled_spec_decode_tokens.get(req_id) or []
        if tree is not None and toks and tree.tokens[: len(toks)] == list(toks) and any(
                p != i for i, p in enumerate(tree.parents[: len(toks)])):
            trees[req_id] = tree
    if not trees:
        return orig(manager, requests, structured_output_request_ids, scheduled_spec_decode_tokens)
    blocks = []
    for req_id in structured_output_request_ids:
        tree = trees.get(req_id)
        if tree is None:  # a chain (or no drafts): vLLM's own code
            out = orig(manager, requests, [req_id], scheduled_spec_decode_tokens)
            blocks.append(np.array(out, copy=True))
            continue
        n = len(scheduled_spec_decode_tokens[req_id])
        if manager._grammar_bitmask is None:  # as vLLM allocates it
            max_batch = manager.vllm_config.scheduler_config.max_num_seqs
            manager._grammar_bitmask = manager.backend.allocate_token_bitmask(
                max_batch * (1 + manager.vllm_config.num_speculative_tokens))
        grammar = requests[req_id].structured_output_request.grammar
        fill_tree_bitmask(grammar, req_id, manager._grammar_bitmask, 0, tree.tokens[:n],
                          tree.parents[:n], manager._full_mask)
        blocks.append(manager._grammar_bitmask[: 1 + n].numpy().copy())
    return np.concatenate(blocks, axis=0)
