"""The OpenAI-compatible server with `--speculative-config '{"method": "bastion", ...}'`
and no other flag: the plugin loads through its entry point in every process."""

import json
import os
import time

import pytest
import requests
from conftest import token_ids

from vllm import SamplingParams
from vllm_bastion.launch import openai_server


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    target, drafter = tiny_pair
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    spec = {"method": "bastion", "model": drafter, "max_nodes": 8, "stats_log_interval_s": 0.5}
    args = ["--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
            "--speculative-config", json.dumps(spec),
            # as the offline reference engine (conftest.ENGINE_KW)
            "--structured-outputs-config", json.dumps({"backend": "xgrammar",
                                                       "disable_any_whitespace": True})]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    with openai_server(target, args, str(log_path), env=env, timeout_s=480) as url:
        yield url, target, log_path


def test_completions_equal_offline_reference(server, reference_llm):
    url, model, _ = server
    prompts = ["def parse(self, text):", "import sys\nfor line in", "class Stack:\n"]
    ref = token_ids(reference_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False))
    tok = reference_llm.get_tokenizer()
    for p, r in zip(prompts, ref):
        resp = requests.post(url + "/v1/completions", json={
            "model": model, "prompt": p, "max_tokens": 24, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True,
        }, timeout=60)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        got = choice.get("token_ids") or tok.encode(choice["text"], add_special_tokens=False)
        assert list(got) == r


def test_chat_and_streaming_through_openai_client(server):
    from openai import OpenAI

    url, model, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "write a loop"}],
        max_tokens=16, temperature=0.0)
    assert chat.choices[0].message.content is not None
    stream = client.completions.create(model=model, prompt="def f(x):", max_tokens=20,
                                       temperature=0.7, seed=3, stream=True)
    pieces = [c.choices[0].text for c in stream if c.choices]
    assert len(pieces) >= 2
    again = client.completions.create(model=model, prompt="def f(x):", max_tokens=20,
                                      temperature=0.7, seed=3)
    assert "".join(pieces) == again.choices[0].text  # seeded sampling is reproducible


def test_unsupported_request_gets_400_and_server_survives(server):
    url, model, _ = server
    resp = requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "x", "max_tokens": 4, "thinking_token_budget": 8}, timeout=30)
    assert resp.status_code == 400
    assert "BASTION" in resp.text and "thinking_token_budget" in resp.text
    assert requests.get(url + "/health", timeout=5).status_code == 200


# (request body extras, the same as SamplingParams kwargs) for the feature tests
FEATURE_REQUESTS = [
    ({}, {}),
    ({"logprobs": 3}, {"logprobs": 3}),
    ({"presence_penalty": 0.8, "frequency_penalty": 0.6},
     {"presence_penalty": 0.8, "frequency_penalty": 0.6}),
    ({"repetition_penalty": 1.4}, {"repetition_penalty": 1.4}),
    ({"min_tokens": 12, "ignore_eos": False}, {"min_tokens": 12, "ignore_eos": False}),
    ({"bad_words": ["self", " return"]}, {"bad_words": ["self", " return"]}),
    ({"allowed_token_ids": list(range(40, 240))}, {"allowed_token_ids": list(range(40, 240))}),
    ({"logprobs": 2, "repetition_penalty": 1.3}, {"logprobs": 2, "repetition_penalty": 1.3}),
]


def test_completions_with_features_equal_offline_reference(server, reference_llm):
    """Concurrent completions, with and without per-request features, each
    token-identical to vLLM without speculation (and logprobs alike)."""
    import asyncio

    from openai import AsyncOpenAI
    from prompts import mixed_prompts

    url, model, _ = server
    n = len(FEATURE_REQUESTS) * 2
    prompts = mixed_prompts(n, seed=31, max_words=40)
    extras = [FEATURE_REQUESTS[i % len(FEATURE_REQUESTS)] for i in range(n)]
    params = [SamplingParams(temperature=0.0, max_tokens=24, **{"ignore_eos": True, **kw})
              for _, kw in extras]
    ref = reference_llm.generate(prompts, params, use_tqdm=False)
    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    async def one(i):
        body, _ = extras[i]
        logprobs = body.get("logprobs")
        extra = {k: v for k, v in body.items() if k != "logprobs"}
        return await client.completions.create(
            model=model, prompt=prompts[i], max_tokens=24, temperature=0.0, logprobs=logprobs,
            extra_body={"ignore_eos": True, "return_token_ids": True, **extra})

    async def all_clients():
        return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(all_clients())
    for i, (res, r) in enumerate(zip(results, ref)):
        ch = res.choices[0]
        ids = list(getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids"))
        assert ids == list(r.outputs[0].token_ids), (i, extras[i])
        if params[i].logprobs is not None:
            want = [lp[t].logprob for lp, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]
            got = ch.logprobs.token_logprobs
            assert len(got) == len(want)
            assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4, (got, want)
            assert len(ch.logprobs.top_logprobs) == len(want)
            assert all(t for t in ch.logprobs.top_logprobs)  # (keyed by text: may merge)


SCHEMA = {"type": "object",
          "properties": {"id": {"type": "integer", "enum": [7, 42, 1234]},
                         "tag": {"type": "string", "enum": ["red", "green", "blue"]}},
          "required": ["id", "tag"], "additionalProperties": False}


@pytest.mark.parametrize("fmt", ["json_schema", "json_object"])
def test_chat_response_format_equals_offline_reference(server, reference_llm, fmt):
    from openai import OpenAI

    from vllm.sampling_params import StructuredOutputsParams

    url, model, _ = server
    client = OpenAI(base_url=url + "/v1", api_key="EMPTY")
    if fmt == "json_schema":
        rf = {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}}
        so = StructuredOutputsParams(json=SCHEMA)
    else:
        rf = {"type": "json_object"}
        so = StructuredOutputsParams(json_object=True)
    messages = [{"role": "user", "content": "describe an item as JSON"}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=48,
                                          temperature=0.0, response_format=rf,
                                          logprobs=True, top_logprobs=2)
    ref = reference_llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=48,
                                                      structured_outputs=so, logprobs=2),
                             use_tqdm=False)[0].outputs[0]
    msg = chat.choices[0]
    assert msg.message.content == ref.text
    if msg.finish_reason == "stop":
        obj = json.loads(msg.message.content)
        assert isinstance(obj, dict)
        if fmt == "json_schema":
            assert set(obj) == {"id", "tag"}
    want = [lp[t].logprob for lp, t in zip(ref.logprobs, ref.token_ids)]
    got = [c.logprob for c in msg.logprobs.content]
    assert len(got) == len(want) and max(abs(a - b) for a, b in zip(got, want)) < 1e-4


@pytest.mark.parametrize("kind,spec,check", [
    ("regex", {"regex": r"[a-z]{2,6}( [0-9]{1,3}){2,4}\."},
     lambda s: __import__("re").fullmatch(r"[a-z]{2,6}( [0-9]{1,3}){2,4}\.", s)),
    ("choice", {"choice": ["alpha", "beta gamma", "delta"]},
     lambda s: s in ("alpha", "beta gamma", "delta")),
    ("grammar", {"grammar": 'root ::= "x" ("ab" | "cd" | "e")+ "y"'},
     lambda s: __import__("re").fullmatch(r"x(ab|cd|e)+y", s)),
])
def test_completions_structured_outputs_equal_offline_reference(server, reference_llm, kind, spec,
                                                                check):
    from vllm.sampling_params import StructuredOutputsParams

    url, model, _ = server
    prompts = ["def parse(self, text):", "import sys\nfor line in"]
    ref = reference_llm.generate(prompts, SamplingParams(
        temperature=0.0, max_tokens=48, structured_outputs=StructuredOutputsParams(**spec)),
        use_tqdm=False)
    for p, r in zip(prompts, ref):
        resp = requests.post(url + "/v1/completions", json={
            "model": model, "prompt": p, "max_tokens": 48, "temperature": 0.0,
            "structured_outputs": spec}, timeout=60)
        assert resp.status_code == 200, resp.text
        choice = resp.json()["choices"][0]
        assert choice["text"] == r.outputs[0].text
        if choice["finish_reason"] == "stop":
            assert check(choice["text"]), choice["text"]


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_and_log_show_tree_stats(server):
    url, model, log_path = server
    requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "while True:", "max_tokens": 32, "temperature": 0.0,
        "ignore_eos": True}, timeout=60)
    time.sleep(1.5)  # the worker writes its stats snapshot at most once per second
    requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "if x:", "max_tokens": 8, "temperature": 0.0}, timeout=60)
    metrics = requests.get(url + "/metrics", timeout=10).text
    # vLLM's own spec-decode metrics see the trees (drafts = tree nodes)
    assert _metric(metrics, "vllm:spec_decode_num_draft_tokens_total") > 0
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" in metrics
    # BASTION's own, next to them
    nodes = _metric(metrics, "vllm:bastion_tree_nodes_total", model_name=model)
    trees = _metric(metrics, "vllm:bastion_trees_total", model_name=model)
    assert nodes and trees and nodes >= trees > 0
    assert _metric(metrics, "vllm:bastion_mean_tree_size", model_name=model) > 0
    assert _metric(metrics, "vllm:bastion_accepted_tokens_total", model_name=model) is not None
    assert _metric(metrics, "vllm:bastion_mean_accepted_length", model_name=model) >= 1.0
    for coef in ("a_c", "b_c", "a_m", "b_m", "t_fix"):
        assert _metric(metrics, "vllm:bastion_latency_model", model_name=model, coefficient=coef) is not None
    assert _metric(metrics, "vllm:bastion_latency_refit_rel_error", model_name=model) >= 0
    assert _metric(metrics, "vllm:bastion_latency_calibration_mape", model_name=model) >= 0
    log = open(log_path).read()
    assert "BASTION tree speculation: DFlash drafter" in log
    assert "BASTION:" in log and "mean tree" in log
    assert "BASTION latency model" in log


BAD_REQUESTS = [
    # (request body overrides, text the error must contain)
    ({"thinking_token_budget": 8}, "thinking_token_budget"),
    ({"min_p": 0.2}, "min_p"),
    ({"logit_bias": {"5": 3.0}}, "logit_bias"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": -5}, "max_tokens"),
]


@pytest.mark.parametrize("body,needle", BAD_REQUESTS, ids=[n for _, n in BAD_REQUESTS])
def test_bad_requests_get_clear_400(server, body, needle):
    url, model, _ = server
    resp = requests.post(url + "/v1/completions",
                         json={"model": model, "prompt": "x", "max_tokens": 4, **body}, timeout=30)
    assert resp.status_code == 400, (resp.status_code, resp.text)
    assert needle in resp.text, resp.text
    assert requests.get(url + "/health", timeout=5).status_code == 200


def test_concurrent_streaming_clients_with_aborts(server, reference_llm):
    """48 concurrent streaming clients, every 10th aborts mid-stream: all others
    complete and equal the no-speculation reference; no KV blocks leak."""
    import asyncio

    from openai import AsyncOpenAI
    from prompts import mixed_prompts

    url, model, _ = server
    n, max_tokens = 48, 24
    prompts = mixed_prompts(n, seed=77, max_words=60)
    ref = token_ids(reference_llm.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True), use_tqdm=False))
    client = AsyncOpenAI(base_url=url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)

    async def one(i):
        stream = await client.completions.create(
            model=model, prompt=prompts[i], max_tokens=max_tokens, temperature=0.0, stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        ids: list[int] = []
        chunks = 0
        async for chunk in stream:
            if chunk.choices:
                ch = chunk.choices[0]
                ids += list(getattr(ch, "token_ids", None) or (ch.model_extra or {}).get("token_ids") or [])
            chunks += 1
            if i % 10 == 3 and chunks == 3:
                await stream.close()  # the client goes away mid-stream
                return i, None
        return i, ids

    async def all_clients():
        return await asyncio.gather(*(one(i) for i in range(n)))

    results = asyncio.run(all_clients())
    done = [(i, t) for i, t in results if t is not None]
    assert len(done) == n - len([i for i in range(n) if i % 10 == 3])
    for i, ids in done:  # token ids: random-weight byte tokens do not detokenize stably
        assert ids == ref[i], i
    # no KV blocks leaked once every request is over
    deadline = time.time() + 30
    usage = None
    while time.time() < deadline:
        metrics = requests.get(url + "/metrics", timeout=10).text
        usage = _metric(metrics, "vllm:kv_cache_usage_perc")
        running = _metric(metrics, "vllm:num_requests_running")
        if usage == 0.0 and running == 0.0:
            break
        time.sleep(0.5)
    assert usage == 0.0, usage
    assert requests.get(url + "/health", timeout=5).status_code == 200
