"""The OpenAI-compatible server with `--speculative-config '{"method": "bastion", ...}'`
and no other flag: the plugin loads through its entry point in every process."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import requests
from conftest import token_ids

from vllm import SamplingParams


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_pair, tmp_path_factory):
    target, drafter = tiny_pair
    port = _free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    spec = {"method": "bastion", "model": drafter, "max_nodes": 8, "stats_log_interval_s": 0.5}
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", target, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
        "--speculative-config", json.dumps(spec),
    ]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {open(log_path).read()[-3000:]}")
        try:
            if requests.get(url + "/health", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"server did not start: {open(log_path).read()[-3000:]}")
    yield url, target, log_path
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
        "model": model, "prompt": "x", "max_tokens": 4, "presence_penalty": 1.0}, timeout=30)
    assert resp.status_code == 400
    assert "BASTION" in resp.text and "presence_penalty" in resp.text
    assert requests.get(url + "/health", timeout=5).status_code == 200


def test_metrics_and_log_show_tree_stats(server):
    url, model, log_path = server
    requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "while True:", "max_tokens": 32, "temperature": 0.0,
        "ignore_eos": True}, timeout=60)
    metrics = requests.get(url + "/metrics", timeout=10).text
    drafts = [line for line in metrics.splitlines() if line.startswith("vllm:spec_decode_num_draft_tokens")]
    assert drafts and float(drafts[0].split()[-1]) > 0
    assert "vllm:spec_decode_num_accepted_tokens_per_pos" in metrics
    time.sleep(1.0)
    requests.post(url + "/v1/completions", json={
        "model": model, "prompt": "if x:", "max_tokens": 8, "temperature": 0.0}, timeout=60)
    log = open(log_path).read()
    assert "BASTION tree speculation: DFlash drafter" in log
    assert "BASTION:" in log and "mean tree" in log
