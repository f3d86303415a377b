"""Test utilities that run inside vLLM workers (via `LLM.collective_rpc`).

`install_second_choice_oracle` makes the drafter's per-depth top-k put a
wrong token at rank 0 and the target's true (greedy) continuation at rank 1,
for requests whose prompts have a known reference continuation. Everything
else stays real: vLLM's scheduler, the target forward with tree attention,
the acceptance walk and KV compaction. A chain of top-1 drafts then accepts
nothing, while the tree accepts through the second-choice branch. Requires
VLLM_ALLOW_INSECURE_SERIALIZATION=1 so the callable can be sent to workers.
"""

from __future__ import annotations

import math

import torch


def install_second_choice_oracle(worker, refs: dict[tuple[int, ...], list[int]],
                                 p_wrong: float = 0.5, p_true: float = 0.3,
                                 true_rank: int = 1) -> bool:
    runner = worker.model_runner
    drafter = runner.drafter
    state: dict = {"sampled": None}
    vocab = runner.input_batch.vocab_size
    orig_propose = runner.propose_draft_token_ids
    orig_take = drafter.take_topk

    def propose(scheduler_output, sampled_token_ids, *args, **kwargs):
        s = sampled_token_ids
        state["sampled"] = s.cpu().tolist() if torch.is_tensor(s) else [list(x) for x in s]
        return orig_propose(scheduler_output, sampled_token_ids, *args, **kwargs)

    def take_topk():
        out = orig_take()
        if out is None:
            return out
        logp, tok = (t.clone() for t in out)
        B, D, K = tok.shape
        if K < 2:
            return logp, tok
        sampled = state["sampled"] or []
        rows = getattr(runner, "_bastion_draft_rows", None)  # the drafting requests' rows
        rows = list(range(B)) if rows is None else [int(r) for r in rows]
        for out_row, i in enumerate(rows):
            rid = runner.input_batch.req_ids[i]
            st = runner.requests.get(rid)
            ref = refs.get(tuple(st.prompt_token_ids)) if st is not None else None
            if ref is None or i >= len(sampled):
                continue
            seq = list(st.output_token_ids) + [t for t in sampled[i] if 0 <= t < vocab]
            n = len(seq)
            if n == 0 or seq != ref[:n]:
                continue
            for d in range(D):
                if n + d >= len(ref):
                    break
                true = ref[n + d]
                row = [(true + 1 + j) % vocab for j in range(K + 1)]
                row = [t for t in row if t != true][:K]
                row[true_rank] = true  # 1: a branch node; 0: the spine
                tok[out_row, d] = torch.tensor(row, dtype=tok.dtype)
                rest = [math.log(max(1e-6, (1 - p_wrong - p_true) / (K - 2 + 1e-9)))] * (K - 2)
                logp[out_row, d] = torch.tensor([math.log(p_wrong), math.log(p_true)] + rest, dtype=logp.dtype)
        return logp, tok

    runner.propose_draft_token_ids = propose
    drafter.take_topk = take_topk
    return True


def remove_oracle(worker) -> bool:
    runner = worker.model_runner
    runner.__dict__.pop("propose_draft_token_ids", None)
    runner.drafter.__dict__.pop("take_topk", None)
    return True


def generate_with_oracle(llm, prompts, params, refs: dict, **oracle_kwargs):
    """`llm.generate(prompts, params)` with the second-choice oracle drafting
    `refs` in every worker; returns (outputs, BASTION's stats of the run)."""
    llm.collective_rpc("bastion_reset_stats")
    llm.collective_rpc(install_second_choice_oracle, args=(refs,), kwargs=oracle_kwargs)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        stats = llm.collective_rpc("bastion_stats")[0]
    finally:
        llm.collective_rpc(remove_oracle)
    return outs, stats
