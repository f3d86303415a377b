"""The lossless contract on real engines: a CI-sized slice of scripts/difftest.py.

Module engines (tiny pair, bf16, vLLM's default compiled mode): vLLM without
speculation, and BASTION with the auto budget whose two timing-driven
decisions (who drafts, how many nodes) are replaced by seeded random ones
(vllm_bastion/tools/random_budget.py), with the second-choice oracle so that
trees are accepted through their branches. Checked:

* every logits row BASTION computes (requests without drafts, tree roots,
  spine and branch nodes) equals, bit for bit, vLLM's row for the same
  tokens; hence greedy output is token-identical in bf16;
* tree sizes and drafting decisions never change a request's tokens, greedy
  or seeded;
* the difftest slice (code / prose / unicode / near-max prompts, batch 1 and
  8, greedy and seeded) has no mismatch at all;
* through the OpenAI server (its own engine): refused parameters are an HTTP
  400 before any stream starts, with no traceback in the log; concurrent
  clients get the offline tokens, and a seeded chat request is the same
  every time.
"""

from __future__ import annotations

import json
import os

import pytest
import requests
from conftest import bastion_spec, make_llm, shutdown, token_ids

from vllm import SamplingParams
from vllm_bastion.tools.difftest import RACE_LOGPROBS, Output, compare, make_prompts, run_offline
from vllm_bastion.tools.logits_recorder import (
    compare_records,
    install_logits_recorder,
    remove_logits_recorder,
    take_logits_records,
)
from vllm_bastion.tools.oracle import install_second_choice_oracle, remove_oracle
from vllm_bastion.tools.random_budget import install_random_budget, remove_random_budget

MAX_TOKENS = 24
COMPILED = dict(dtype="bfloat16", enforce_eager=False, max_model_len=512,
                enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=256,
                max_logprobs=RACE_LOGPROBS)
SPEC = dict(max_nodes=24, topk=4, calibrate=False)  # auto budget, prior latency model


@pytest.fixture(scope="module")
def engines(tiny_pair):
    # compiled engines, each in its own processes as users run them (two
    # compiled engines in one process share torch.compile's state)
    ref = make_llm(tiny_pair[0], multiprocess=True, **COMPILED)
    bas = make_llm(tiny_pair[0], multiprocess=True,
                   speculative_config=bastion_spec(tiny_pair[1], **SPEC), **COMPILED)
    yield ref, bas
    for llm in (ref, bas):
        shutdown(llm)


@pytest.fixture(scope="module")
def prompts(tiny_pair):
    return make_prompts(tiny_pair[0], 24, seed=1, max_model_len=512, max_tokens=MAX_TOKENS)


def _oracle_refs(prompt_list, outs):
    """The reference continuation of every prompt, keyed as the oracle wants."""
    return {tuple(p.token_ids): o.tokens for p, o in zip(prompt_list, outs)}


def _greedy(llm, prompt_list, batch, logprobs=False):
    return run_offline(llm, prompt_list, "greedy", batch, MAX_TOKENS, logprobs=logprobs)


def test_every_verify_row_equals_vllm_bit_for_bit(engines, prompts):
    """Logits of every row kind, bf16, compiled: BASTION's equal vLLM's."""
    ref, bas = engines
    some = prompts[:8]
    for llm in engines:
        llm.collective_rpc(install_logits_recorder)
    try:
        ref_out = _greedy(ref, some, 8)
        ref_rows = ref.collective_rpc(take_logits_records)[0]
        rows, got = [], []
        # the true continuation drafted off the spine (accepted through
        # branch rows), then on it (accepted along the spine), then on it
        # with one-node trees only (chains that fit one exact query block:
        # verified on vLLM's own attention metadata)
        for true_rank, nodes in ((1, None), (0, None), (0, 1)):
            bas.collective_rpc(install_second_choice_oracle,
                               args=(_oracle_refs(some, ref_out),), kwargs={"true_rank": true_rank})
            bas.collective_rpc(install_random_budget, args=(1 + true_rank,),
                               kwargs={"max_nodes": nodes})
            try:
                got.append(_greedy(bas, some, 8))
            finally:
                bas.collective_rpc(remove_oracle)
                bas.collective_rpc(remove_random_budget)
            rows += bas.collective_rpc(take_logits_records)[0]
    finally:
        for llm in engines:
            llm.collective_rpc(remove_logits_recorder)
    for g in got:
        assert [o.tokens for o in g] == [o.tokens for o in ref_out]
    for kind in ("last", "root", "spine", "branch"):
        r = compare_records(ref_rows, rows, kinds=(kind,))
        assert not r["errors"], r["errors"]
        assert r["compared"] > 0, kind  # the oracle makes every kind occur
        assert r["differing"] == 0, (kind, r)
    # both verify paths ran: tree-attention metadata (branch rows, long chains)
    # and chains that fit one exact query block, on vLLM's own metadata
    steps = bas.collective_rpc("bastion_stats")[0]["time_per_step"]
    exact_rows = bas.collective_rpc(_exact_block_rows)[0]
    assert steps["tree_metadata_steps"] > 0, steps
    assert steps["vllm_metadata_steps"] > 0 or exact_rows == 1, (steps, exact_rows)


def _exact_block_rows(worker):
    return worker.model_runner._bastion_chain_rows


def test_tree_sizes_and_drafting_never_change_tokens(engines, prompts):
    """What the timings decide (random here) changes no token, greedy or seeded."""
    ref, bas = engines
    some = prompts[8:16]
    ref_out = _greedy(ref, some, 4)
    runs = {}
    for seed in (2, 3):
        bas.collective_rpc(install_random_budget, args=(seed,))
        bas.collective_rpc(install_second_choice_oracle, args=(_oracle_refs(some, ref_out),))
        try:
            runs[seed] = (_greedy(bas, some, 4),
                          run_offline(bas, some, "seeded", 4, MAX_TOKENS),
                          run_offline(bas, some[:3], "seeded", 1, MAX_TOKENS))
        finally:
            bas.collective_rpc(remove_oracle)
            bas.collective_rpc(remove_random_budget)
        stats = bas.collective_rpc("bastion_stats")[0]
        assert stats["trees"] > 0
    (g2, s2, a2), (g3, s3, a3) = runs[2], runs[3]
    assert [o.tokens for o in g2] == [o.tokens for o in g3] == [o.tokens for o in ref_out]
    assert [o.tokens for o in s2] == [o.tokens for o in s3]
    assert [o.tokens for o in a2] == [o.tokens for o in a3] == [o.tokens for o in s2[:3]]


def test_difftest_slice_has_no_mismatch(engines, prompts):
    """Every prompt kind, batch 1 and 8: greedy equal to vLLM (no near-tie
    needed: the rows are exact); seeded equal across tree decisions."""
    ref, bas = engines
    assert {p.kind for p in prompts} == {"code", "prose", "unicode", "near-max"}
    for batch in (1, 8):
        refs = _greedy(ref, prompts, batch, logprobs=True)
        bas.collective_rpc(install_random_budget, args=(10 + batch,))
        try:
            got = _greedy(bas, prompts, batch)
            seeded = run_offline(bas, prompts, "seeded", batch, MAX_TOKENS)
        finally:
            bas.collective_rpc(remove_random_budget)
        row = compare("bastion", "offline", "greedy", batch, prompts, refs, got, 0.25, 0.0)
        assert row.counts["none"] == len(prompts), row
        # seeded: BASTION never drafting is the reference (vLLM's forward,
        # BASTION's keyed sampling); here: all drafting switched off at random
        bas.collective_rpc(install_random_budget, args=(20 + batch, 0.0))
        try:
            never = run_offline(bas, prompts, "seeded", batch, MAX_TOKENS, logprobs=True)
        finally:
            bas.collective_rpc(remove_random_budget)
        row = compare("bastion", "offline", "seeded", batch, prompts, never, seeded, 0.25, 0.0)
        assert row.counts["none"] == len(prompts), row
        # the classifier's seeded margins are real: the race it recomputes
        # from the reference's log-probs and the keyed noise picks every
        # token the engine emitted
        assert all(o.race is not None and len(o.race.logprobs) == len(o.tokens) for o in never)
        # (unknown, None, only where every recorded token ties the k-th: rare)
        winners = [[o.race.winner(j) for j in range(len(o.tokens))] for o in never]
        assert [[t if w is not None else None for w, t in zip(ws, o.tokens)]
                for ws, o in zip(winners, never)] == winners
        assert sum(w is None for ws in winners for w in ws) <= len(prompts)


def test_divergence_classifier():
    from vllm_bastion.tools.difftest import SeededRace, classify

    ref = Output([5, 6, 7], top2=[(-0.1, -3.0), (-0.69, -0.70), (-0.2, -2.0)])
    assert classify(ref, Output([5, 6, 7]), 0.25) == ("none", None)
    cause, margin = classify(ref, Output([5, 9, 7]), 0.25)
    assert cause == "near-tie" and margin == pytest.approx(0.01)
    assert classify(ref, Output([4, 6, 7]), 0.25)[0] == "other"
    assert classify(Output([5, 6]), Output([5, 6, 8]), 0.25)[0] == "other"  # no margin known

    # seeded: the margin of the reference's exponential race, in logit units
    race = SeededRace(seed=5, start=10, logprobs=[{1: -0.5, 2: -1.0, 3: -5.0}])
    scores = race.scores(0)
    assert set(scores) == {1, 2}  # top-p 0.9 at T 0.8 drops token 3
    win = race.winner(0)
    lose = 3 - win
    margin = scores[win] - scores[lose]
    assert margin > 0
    ref = Output([7, win], race=SeededRace(5, 9, [{7: 0.0}, {1: -0.5, 2: -1.0, 3: -5.0}]))
    assert ref.race.scores(1) == scores  # keyed by absolute position: start + j
    assert classify(ref, Output([7, lose]), margin + 1e-6) == ("near-tie", pytest.approx(margin))
    assert classify(ref, Output([7, lose]), margin - 1e-6)[0] == "other"
    # top-p dropped token 3 far below its cut: letting it in is a large change
    cause, margin = classify(ref, Output([7, 3]), 0.25)
    assert cause == "other" and margin > 1.0
    assert classify(ref, Output([7, 99]), 100.0) == ("other", None)  # never recorded
    # top-k keeps every token tied with the k-th (as vLLM's rule), which
    # moves the top-p cut; when every recorded token ties the k-th, more may
    # be tied unrecorded: the race is unknown
    tied = SeededRace(5, 10, [{1: -1.0, 2: -1.2, 3: -1.2, 4: -9.0}], top_k=2, top_p=1.0)
    assert set(tied.scores(0)) == {1, 2, 3}
    flat = SeededRace(5, 10, [{i: -1.0 for i in range(RACE_LOGPROBS)}])
    assert flat.scores(0) is None and flat.winner(0) is None
    assert classify(Output([7, 1], race=SeededRace(5, 9, [{7: 0.0}, flat.logprobs[0]])),
                    Output([7, 2]), 100.0) == ("other", None)
    # top-p cutting through tied tokens: which of them stay is the order of
    # equal logits (torch's CPU sort is not stable), so the race is undecided
    # between them, and a divergence to one of them is a tie at margin 0
    lps = [{1: -1.0, 2: -3.0, 3: -3.0}]
    seed = next(s for s in range(100)
                if (lambda sc: sc[2] > sc[1])(SeededRace(s, 10, lps, temperature=1.0, top_p=0.85).scores(0)))
    und = SeededRace(seed, 10, lps, temperature=1.0, top_p=0.85)
    assert und.undecided(0) == {2, 3} and set(und.scores(0)) == {1, 2, 3} and und.winner(0) is None
    ref = Output([1], race=und)
    assert classify(ref, Output([2]), 0.25) == ("near-tie", 0.0)


def test_seeded_classifier_measures_membership_flips():
    """A run whose row is off by a little can keep a token the reference's
    top-k/top-p dropped (or drop one it kept): the seeded margin is the
    smallest change that explains the emitted token, membership included."""
    from vllm_bastion.tools.difftest import SeededRace, classify

    def seeded(lps, want, **kw):  # a seed whose race at position 10 satisfies want(race)
        for s in range(500):
            r = SeededRace(s, 10, lps, temperature=1.0, **kw)
            if want(r.race(0)):
                return r
        raise AssertionError("no such seed")

    lps = [{1: -0.1, 2: -2.5, 3: -2.6}]  # p(3) = 0.0698 at T = 1
    # top-p 0.93 drops token 3 by a hair (its mass 0.0698 <= the cut 0.07)
    r = seeded(lps, lambda x: max(x.scores, key=x.scores.get) == 3, top_p=0.93, top_k=20)
    assert 3 not in r.scores(0) and r.race(0).flip[3] < 0.01
    cause, margin = classify(Output([r.winner(0)], race=r), Output([3]), 0.25)
    assert cause == "near-tie" and margin == pytest.approx(r.race(0).flip[3])
    # top-p 0.9305 keeps token 3 by a hair: a run that drops it emits the runner-up,
    # however far behind it was in the race
    def runner_up_far(x):
        s = sorted(x.running, key=x.scores.get, reverse=True)
        return s[0] == 3 and x.scores[3] - x.scores[s[1]] > 1.0
    r = seeded(lps, runner_up_far, top_p=0.9305, top_k=20)
    second = sorted(r.scores(0), key=r.scores(0).get)[-2]
    cause, margin = classify(Output([3], race=r), Output([second]), 0.25)
    assert cause == "near-tie" and margin == pytest.approx(r.race(0).flip[3]) and margin < 0.01
    # far from the cut (top-p 0.99), the same divergence is a real mismatch
    far = SeededRace(r.seed, 10, lps, temperature=1.0, top_p=0.99, top_k=20)
    assert far.winner(0) == 3 and classify(Output([3], race=far), Output([second]), 0.25)[0] == "other"
    # top-k: token 3 is 0.05 below the 2nd largest; a run that lets it in
    lps = [{1: -1.0, 2: -1.1, 3: -1.15, 4: -5.0}]
    r = seeded(lps, lambda x: max(x.scores, key=x.scores.get) == 3, top_p=1.0, top_k=2)
    assert set(r.scores(0)) == {1, 2}
    cause, margin = classify(Output([r.winner(0)], race=r), Output([3]), 0.25)
    assert cause == "near-tie" and margin == pytest.approx(0.05)
    # and a token far below the k-th is not explained by a small change
    lps = [{1: -1.0, 2: -1.1, 3: -4.0, 4: -5.0}]
    r = seeded(lps, lambda x: x.scores[3] > max(x.scores[1], x.scores[2]), top_p=1.0, top_k=2)
    assert classify(Output([r.winner(0)], race=r), Output([3]), 0.25) == ("other", pytest.approx(2.9))


# ------------------------------------------------------------------ the server


def bastion_refused_field() -> tuple[dict, str] | None:
    """A request field BASTION itself refuses (not vLLM): the first one of
    `_patches.UNSUPPORTED_REQUEST_FEATURES` that is still refused. Features
    that start working on trees simply drop out of that list."""
    from vllm_bastion._patches import UNSUPPORTED_REQUEST_FEATURES

    bodies = {
        "bad_words": {"bad_words": ["def"]},
        "min_tokens": {"min_tokens": 2},
        "allowed_token_ids": {"allowed_token_ids": [1, 2, 3]},
        "presence_penalty": {"presence_penalty": 0.5},
        "frequency_penalty": {"frequency_penalty": 0.5},
        "repetition_penalty": {"repetition_penalty": 1.3},
        "logprobs": {"logprobs": 2},
        "prompt_logprobs": {"prompt_logprobs": 1},
    }
    for _, name in UNSUPPORTED_REQUEST_FEATURES:
        if name in bodies:
            return bodies[name], name
    return None


VLLM_REFUSED = ({"min_p": 0.2}, "min_p")  # vLLM's own refusal with speculation


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    from vllm_bastion.launch import openai_server

    target, drafter = tiny_pair
    log_path = tmp_path_factory.mktemp("lossless-server") / "server.log"
    spec = {"method": "bastion", "model": drafter, **SPEC}
    args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
            "--speculative-config", json.dumps(spec)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with openai_server(target, args, str(log_path), env=env, timeout_s=480) as url:
        yield url, target, log_path


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
@pytest.mark.parametrize("stream", [True, False])
def test_refusals_are_400_before_the_stream_starts(server, endpoint, stream):
    url, model, log_path = server
    cases = [VLLM_REFUSED] + ([bastion_refused_field()] if bastion_refused_field() else [])
    before = open(log_path).read()
    for body, needle in cases:
        req = {"model": model, "max_tokens": 4, "stream": stream, **body}
        if endpoint == "chat":
            req["messages"] = [{"role": "user", "content": "hi"}]
            path = "/v1/chat/completions"
        else:
            req["prompt"] = "def f():"
            path = "/v1/completions"
        with requests.post(url + path, json=req, timeout=60, stream=True) as resp:
            assert resp.status_code == 400, (needle, resp.status_code, resp.text[:300])
            assert resp.headers["content-type"].startswith("application/json")
            assert needle in resp.text
    new_log = open(log_path).read()[len(before):]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[-2000:]
    assert requests.get(url + "/health", timeout=5).status_code == 200


def test_server_concurrent_clients_get_the_offline_tokens(server, reference_llm, tiny_pair):
    from vllm_bastion.tools.difftest import run_server

    url, model, _ = server
    some = make_prompts(tiny_pair[0], 16, seed=5, max_model_len=1024, max_tokens=MAX_TOKENS)
    refs = run_offline(reference_llm, some, "greedy", 16, MAX_TOKENS, logprobs=True)
    got = run_server(url, model, some, "greedy", 16, MAX_TOKENS)
    row = compare("server", "server", "greedy", 16, some, refs, got, 1e-3, 0.0)
    assert row.counts["other"] == 0 and row.counts["none"] == len(some), row
    seeded = run_server(url, model, some, "seeded", 16, MAX_TOKENS)
    alone = run_server(url, model, some[:4], "seeded", 1, MAX_TOKENS)
    assert [o.tokens for o in alone] == [o.tokens for o in seeded[:4]]


def test_seeded_chat_request_is_the_same_every_time(server):
    """The issue's request: temperature 0.8, top_p 0.9, top_k 20, seed 2023."""
    url, model, _ = server
    req = {"model": model, "messages": [{"role": "user", "content": "write a loop over a list"}],
           "max_tokens": 32, "temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 2023}
    texts = set()
    for _ in range(4):
        r = requests.post(url + "/v1/chat/completions", json=req, timeout=120)
        assert r.status_code == 200, r.text
        texts.add(r.json()["choices"][0]["message"]["content"])
    assert len(texts) == 1, texts
