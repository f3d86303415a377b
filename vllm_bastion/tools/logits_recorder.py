"""Record the target's logits row by row inside vLLM workers (test utility).

Installed with `LLM.collective_rpc(install_logits_recorder)` on any V1 runner,
with or without speculation (BASTION's, vLLM's own); `take_logits_records`
returns and clears what was recorded. Every logits row the runner samples
from is stored as it came out of the model (dtype and bits unchanged) with a
key that does not depend on how the row was batched:

    (prompt token ids, context token ids after the prompt)

the exact token sequence the row conditions on. So the same row can be found
in a run without speculation, a run with chains, and a run with trees, and
its logits compared bit for bit. Each record also says what the row was
(`kind`: "last" = the last scheduled row of a request without drafts, i.e. a
prefill chunk or a plain decode row; "root" = the first verify row of a
request with drafts; "spine"/"branch" = a draft node on / off the leading
chain) and the step's batch composition (`batch`: (scheduled, cached)
tokens per request, and the step's total rows), so callers can restrict a
comparison to rows computed in the same batch.

Requires VLLM_ALLOW_INSECURE_SERIALIZATION=1 (the callables are pickled).
"""

from __future__ import annotations

import torch

_ATTR = "_logits_recorder"


def install_logits_recorder(worker) -> bool:
    runner = worker.model_runner
    if _ATTR in runner.__dict__:
        return True
    state = {"records": [], "sched": None, "spec": None, "step": 0}
    runner.__dict__[_ATTR] = state
    orig_exec = runner.execute_model
    orig_sample = runner._sample

    def execute_model(scheduler_output, intermediate_tensors=None):
        state["sched"] = dict(scheduler_output.num_scheduled_tokens)
        state["spec"] = {k: list(v) for k, v in
                         (scheduler_output.scheduled_spec_decode_tokens or {}).items()}
        state["step"] += 1
        return orig_exec(scheduler_output, intermediate_tensors)

    def _sample(logits, spec_decode_metadata):
        plan = getattr(runner, "_bastion_plan", None)
        try:
            _record(runner, state, logits, spec_decode_metadata, plan)
        except Exception as e:  # noqa: BLE001 - a recorder must never break the engine
            state["records"].append({"error": repr(e)})
        return orig_sample(logits, spec_decode_metadata)

    runner.execute_model = execute_model
    runner._sample = _sample
    return True


def _record(runner, state, logits, spec_md, plan) -> None:
    ib = runner.input_batch
    B = ib.num_reqs
    req_ids = list(ib.req_ids[:B])
    sched = [int(state["sched"].get(r, 0)) for r in req_ids]
    computed = [int(x) for x in ib.num_computed_tokens_cpu[:B]]
    spec = state["spec"] or {}
    batch = (tuple(zip(sched, computed)), sum(sched))
    lg = logits.detach().to("cpu", copy=True)
    rows = []  # (req index, path after the committed context, kind)
    use_plan = spec_md is not None and plan is not None
    for i, rid in enumerate(req_ids):
        n = len(spec.get(rid, [])) if spec_md is not None else 0
        if use_plan:
            n = int(plan.trees.num_nodes[i])
        if n == 0:
            rows.append((i, (), "last"))
            continue
        rows.append((i, (), "root"))
        if use_plan:
            toks = plan.trees.tokens[i].tolist()
            par = plan.trees.parents[i].tolist()
            spine = int(plan.spine_len[i])
            for j in range(1, n + 1):
                path, k = [], j
                while k > 0:
                    path.append(toks[k])
                    k = par[k]
                rows.append((i, tuple(reversed(path)), "spine" if j <= spine else "branch"))
        else:
            drafts = spec[rid]
            for j in range(1, n + 1):
                rows.append((i, tuple(drafts[:j]), "spine"))
    if len(rows) != lg.shape[0]:
        state["records"].append({"error": f"{len(rows)} keyed rows for {lg.shape[0]} logits rows",
                                 "step": state["step"]})
        return
    for r, (i, path, kind) in enumerate(rows):
        st = runner.requests[req_ids[i]]
        prompt = tuple(st.prompt_token_ids)
        if kind == "last":
            n_ctx = computed[i] + sched[i]
        else:  # root + nodes: the root is the first scheduled row
            n_ctx = computed[i] + 1
        seq = prompt + tuple(st.output_token_ids)
        ctx = seq[len(prompt):n_ctx] if n_ctx > len(prompt) else ()
        if n_ctx < len(prompt):  # a partial prefill chunk
            prompt_key, ctx = prompt[:n_ctx], ("<chunk>",)
        else:
            prompt_key = prompt
        state["records"].append({
            "key": (prompt_key, tuple(ctx) + path),
            "kind": kind,
            "req": req_ids[i],
            "step": state["step"],
            "batch": batch,
            "logits": lg[r].clone(),
        })


def take_logits_records(worker) -> list[dict]:
    state = worker.model_runner.__dict__.get(_ATTR)
    if state is None:
        return []
    out, state["records"] = state["records"], []
    return out


def remove_logits_recorder(worker) -> bool:
    runner = worker.model_runner
    runner.__dict__.pop(_ATTR, None)
    runner.__dict__.pop("execute_model", None)
    runner.__dict__.pop("_sample", None)
    return True


def _freeze(x):
    """Record keys come back from the workers with tuples turned into lists."""
    return tuple(_freeze(v) for v in x) if isinstance(x, (list, tuple)) else x


def compare_records(ref: list[dict], got: list[dict], kinds=("last",), same_batch=False) -> dict:
    """Bitwise comparison of rows with equal keys.

    Returns counts: compared, equal, differing, max_abs_diff, and up to 5
    examples of differing keys (as (len(prompt), len(ctx), kind)). With
    `same_batch`, only rows whose step had the same batch composition."""
    index = {}
    for r in ref:
        if "key" in r:
            index.setdefault(_freeze(r["key"]), []).append(r)
    out = {"compared": 0, "equal": 0, "differing": 0, "max_abs_diff": 0.0, "examples": [],
           "errors": [r["error"] for r in got + ref if "error" in r]}
    for g in got:
        if "key" not in g or g["kind"] not in kinds:
            continue
        cands = index.get(_freeze(g["key"]), [])
        if same_batch:
            cands = [c for c in cands if _freeze(c["batch"]) == _freeze(g["batch"])]
        if not cands:
            continue
        out["compared"] += 1
        if any(torch.equal(c["logits"], g["logits"]) for c in cands):
            out["equal"] += 1
        else:
            out["differing"] += 1
            d = (cands[0]["logits"].float() - g["logits"].float()).abs().max().item()
            out["max_abs_diff"] = max(out["max_abs_diff"], d)
            if len(out["examples"]) < 5:
                out["examples"].append((len(g["key"][0]), len(g["key"][1]), g["kind"], d))
    return out
