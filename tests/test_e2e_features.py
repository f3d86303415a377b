"""vLLM's per-request features on BASTION trees, in a real engine: penalties,
min_tokens, bad words, allowed token ids, logprobs / prompt_logprobs and
structured outputs (regex, choice, JSON schema, JSON object, grammar).

Greedy output must equal vLLM without speculation token for token, and
logprobs must match it, with trees that really accept through their
branches: the second-choice oracle (vllm_bastion/tools/oracle.py) drafts the
reference continuation at rank 2 of every depth, so a chain of top-1 drafts
accepts nothing and every accepted token comes from a branch row, whose
processing must use its own path's history (or grammar state). Sampling with
penalties must follow the exact target distribution.
"""

import json
import math
import re

import pytest
import torch
from conftest import bastion_spec, make_llm, shutdown, token_ids
from prompts import mixed_prompts
from test_e2e_sampling import chi2_pvalue

from vllm import SamplingParams
from vllm.sampling_params import StructuredOutputsParams
from vllm_bastion.tools.oracle import generate_with_oracle

MAX_TOKENS = 32


@pytest.fixture(scope="module")
def bastion_llm(tiny_pair):
    llm = make_llm(tiny_pair[0],
                   speculative_config=bastion_spec(tiny_pair[1], max_nodes=12, topk=4, budget="fixed"))
    yield llm
    shutdown(llm)


@pytest.fixture(scope="module")
def prompts():
    return mixed_prompts(6, seed=21, max_words=60)


def greedy(**kw):
    kw.setdefault("ignore_eos", True)
    kw.setdefault("max_tokens", MAX_TOKENS)
    return SamplingParams(temperature=0.0, **kw)


def with_oracle(llm, prompts, params, reference_outputs):
    """BASTION's outputs with the reference continuation drafted at rank 2
    (a top-1 chain would accept nothing), and the tree statistics."""
    refs = {tuple(o.prompt_token_ids): list(o.outputs[0].token_ids) for o in reference_outputs}
    return generate_with_oracle(llm, prompts, params, refs)


def assert_trees_accepted_through_branches(stats):
    assert stats["chain_accepted"] == 0, stats  # the top-1 chain is always wrong
    assert stats["accepted"] >= stats["trees"], stats  # >= 1 accepted branch node per tree


def roundtrip_word(tok, ids):
    """A string of 1-2 consecutive output tokens that tokenizes back to them."""
    for n in (2, 1):
        for i in range(2, len(ids) - n):
            word = tok.decode(ids[i:i + n])
            if word.strip() and tok.encode(word, add_special_tokens=False) == ids[i:i + n]:
                return word, ids[i:i + n]
    raise AssertionError("no round-tripping word in the reference output")


def feature_params(name, tok, plain):
    """Per-prompt SamplingParams exercising one feature (plain: the reference
    greedy outputs without it, to pick stop tokens and bad words that occur)."""
    if name == "repetition_penalty":
        return [greedy(repetition_penalty=1.6)] * len(plain)
    if name == "frequency_presence_penalty":
        return [greedy(frequency_penalty=1.5, presence_penalty=0.8)] * len(plain)
    if name == "min_tokens":
        # stop at the token the plain output emits 4th, but not before 20 tokens
        return [greedy(ignore_eos=False, stop_token_ids=[ids[3]], min_tokens=20) for ids in plain]
    if name == "bad_words":
        return [greedy(bad_words=[roundtrip_word(tok, ids)[0]]) for ids in plain]
    if name == "allowed_token_ids":
        return [greedy(allowed_token_ids=list(range(40, 240)))] * len(plain)
    raise KeyError(name)


FEATURES = ["repetition_penalty", "frequency_presence_penalty", "min_tokens", "bad_words",
            "allowed_token_ids"]


@pytest.fixture(scope="module")
def plain(reference_llm, prompts):
    return token_ids(reference_llm.generate(prompts, greedy(), use_tqdm=False))


@pytest.mark.parametrize("feature", FEATURES)
def test_feature_greedy_equals_no_speculation(bastion_llm, reference_llm, prompts, plain, feature):
    params = feature_params(feature, bastion_llm.get_tokenizer(), plain)
    ref = reference_llm.generate(prompts, params, use_tqdm=False)
    assert token_ids(ref) != plain  # the feature changes the output
    outs, stats = with_oracle(bastion_llm, prompts, params, ref)
    assert token_ids(outs) == token_ids(ref)
    assert_trees_accepted_through_branches(stats)


def test_mixed_batch_of_features_equals_no_speculation(bastion_llm, reference_llm, prompts, plain):
    """One batch: every feature on some requests, none on others."""
    tok = bastion_llm.get_tokenizer()
    ps = prompts + mixed_prompts(len(FEATURES) + 1, seed=22, max_words=60)
    params = [greedy()] * len(prompts)
    more = token_ids(reference_llm.generate(ps[len(prompts):], greedy(), use_tqdm=False))
    for i, name in enumerate(FEATURES):
        params.append(feature_params(name, tok, [more[i]])[0])
    params.append(greedy(logprobs=2))
    ref = reference_llm.generate(ps, params, use_tqdm=False)
    outs, stats = with_oracle(bastion_llm, ps, params, ref)
    assert token_ids(outs) == token_ids(ref)
    assert_trees_accepted_through_branches(stats)


def assert_logprobs_close(got, want, tol=1e-4):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if g is None or w is None:
            assert g is None and w is None
            continue
        assert set(g) == set(w), (g, w)
        for t in w:
            assert abs(g[t].logprob - w[t].logprob) < tol, (t, g[t], w[t])
            assert g[t].rank == w[t].rank, (t, g[t], w[t])


def test_logprobs_and_prompt_logprobs_equal_no_speculation(bastion_llm, reference_llm, prompts):
    params = [greedy(logprobs=4, prompt_logprobs=2), greedy(logprobs=0),
              greedy(logprobs=3, repetition_penalty=1.4), greedy()] * 2
    params = params[: len(prompts)]
    ref = reference_llm.generate(prompts, params, use_tqdm=False)
    outs, stats = with_oracle(bastion_llm, prompts, params, ref)
    assert token_ids(outs) == token_ids(ref)
    assert_trees_accepted_through_branches(stats)
    for o, r, p in zip(outs, ref, params):
        if p.logprobs is None:
            assert o.outputs[0].logprobs is None
        else:
            assert len(o.outputs[0].logprobs) == MAX_TOKENS
            assert_logprobs_close(o.outputs[0].logprobs, r.outputs[0].logprobs)
        if p.prompt_logprobs is not None:
            assert_logprobs_close(o.prompt_logprobs, r.prompt_logprobs)


SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer", "enum": [7, 42, 1234]},
                   "tag": {"type": "string", "enum": ["red", "green", "blue"]},
                   "ok": {"type": "boolean"}},
    "required": ["id", "tag", "ok"], "additionalProperties": False,
}
# (the engines run xgrammar without free JSON whitespace, see conftest.py)
STRUCTURED = {
    "regex": (dict(regex=r"[a-z]{2,6}( [0-9]{1,3}){2,4}\."),
              lambda s: re.fullmatch(r"[a-z]{2,6}( [0-9]{1,3}){2,4}\.", s)),
    "choice": (dict(choice=["alpha", "beta gamma", "delta", "epsilon zeta eta"]),
               lambda s: s in ("alpha", "beta gamma", "delta", "epsilon zeta eta")),
    "json_schema": (dict(json=SCHEMA),
                    lambda s: set(json.loads(s)) == {"id", "tag", "ok"}),
    "json_object": (dict(json_object=True),
                    lambda s: isinstance(json.loads(s), dict)),
    "grammar": (dict(grammar='root ::= "x" ("ab" | "cd" | "e")+ "y"'),
                lambda s: re.fullmatch(r"x(ab|cd|e)+y", s)),
}


@pytest.mark.parametrize("kind", list(STRUCTURED))
def test_structured_outputs_on_trees(bastion_llm, reference_llm, prompts, kind):
    spec, valid = STRUCTURED[kind]
    sp = SamplingParams(temperature=0.0, max_tokens=64,
                        structured_outputs=StructuredOutputsParams(**spec))
    ref = reference_llm.generate(prompts, sp, use_tqdm=False)
    outs, stats = with_oracle(bastion_llm, prompts, sp, ref)
    assert token_ids(outs) == token_ids(ref)
    for o in outs:
        if o.outputs[0].finish_reason == "stop":
            assert valid(o.outputs[0].text), o.outputs[0].text
    assert any(o.outputs[0].finish_reason == "stop" for o in outs)
    assert_trees_accepted_through_branches(stats)
    # the grammar pruned drafts before verification: fewer nodes than drafted
    assert stats["nodes"] < 12 * stats["trees"], stats


def test_structured_and_plain_requests_in_one_batch(bastion_llm, reference_llm, prompts):
    spec, valid = STRUCTURED["json_schema"]
    so = SamplingParams(temperature=0.0, max_tokens=64,
                        structured_outputs=StructuredOutputsParams(**spec))
    params = [so if i % 2 else greedy(presence_penalty=0.7) for i in range(len(prompts))]
    ref = reference_llm.generate(prompts, params, use_tqdm=False)
    outs, stats = with_oracle(bastion_llm, prompts, params, ref)
    assert token_ids(outs) == token_ids(ref)
    assert_trees_accepted_through_branches(stats)


def exact_distribution_with_penalties(model_dir, prompt_ids, horizon, temperature, top_k, rep,
                                      freq, pres):
    """P(x1..xH | prompt) under vLLM's penalties (repetition over prompt and
    output, frequency / presence over the output), then temperature + top-k."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    dist = {(): 1.0}
    with torch.no_grad():
        for _ in range(horizon):
            nxt = {}
            for seq, p in dist.items():
                ids = torch.tensor([list(prompt_ids) + list(seq)])
                logits = model(ids).logits[0, -1].float()
                seen = set(prompt_ids) | set(seq)
                for t in seen:
                    logits[t] = logits[t] / rep if logits[t] > 0 else logits[t] * rep
                for t in set(seq):
                    logits[t] -= freq * seq.count(t) + pres
                logits = logits / temperature
                kth = logits.topk(top_k).values[-1]
                logits[logits < kth] = float("-inf")
                probs = torch.softmax(logits, -1)
                for tok in torch.nonzero(probs > 0).flatten().tolist():
                    nxt[seq + (tok,)] = p * float(probs[tok])
            dist = nxt
    return dist


def test_sampling_with_penalties_follows_the_target_distribution(bastion_llm, tiny_pair):
    """Lossless sampling with penalties: BASTION's samples (accepting through
    tree branches) follow the exact penalized target law."""
    T, K, H, N = 0.9, 3, 3, 1200
    rep, freq, pres = 1.5, 1.0, 0.5
    prompt = "def value(self):\n    return"
    pen = dict(repetition_penalty=rep, frequency_penalty=freq, presence_penalty=pres)
    first = bastion_llm.generate([prompt], greedy(max_tokens=8, **pen), use_tqdm=False)[0]
    prompt_ids = list(first.prompt_token_ids)
    exact = exact_distribution_with_penalties(tiny_pair[0], prompt_ids, H, T, K, rep, freq, pres)
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-5)
    # drafts: the most likely penalized continuation at rank 2
    best = max(exact, key=exact.get)
    refs = {tuple(prompt_ids): list(best)}
    params = [SamplingParams(temperature=T, top_k=K, max_tokens=H, seed=s, ignore_eos=True, **pen)
              for s in range(N)]
    outs, stats = generate_with_oracle(bastion_llm, [prompt] * N, params, refs)
    counts = {}
    for o in outs:
        s = tuple(o.outputs[0].token_ids)
        counts[s] = counts.get(s, 0) + 1
    p, stat = chi2_pvalue(counts, exact, N)
    tv = 0.5 * sum(abs(counts.get(s, 0) / N - exact.get(s, 0)) for s in set(counts) | set(exact))
    assert stats["accepted"] > 0.2 * stats["trees"], stats  # the walk accepted drafts
    assert p > 1e-3, (p, stat, tv)
    assert tv < 0.08
