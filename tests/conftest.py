"""Shared fixtures: tiny models built locally at test time, and vLLM engines.

Engines are expensive (~15-30 s to start on 2 CPU cores), so each test module
shares one BASTION engine, and the no-speculation reference engine is shared
by the whole session.
"""

from __future__ import annotations

import os
import sys

# vLLM on CPU needs a fixed KV cache size; the oracle test utility sends a
# callable to the workers, which needs vLLM's pickle fallback.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402

from tiny_models import make_drafter, make_target  # noqa: E402

# structured outputs: no free whitespace in JSON, so the random-weight target's
# JSON finishes (and parses) within a test's token budget
ENGINE_KW = dict(dtype="float32", max_model_len=1024, seed=0, enforce_eager=True,
                 max_num_seqs=32, disable_log_stats=False,
                 structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_pair")
    target = make_target(str(root / "target"))
    drafter = make_drafter(target, str(root / "drafter"), block_size=8)
    return target, drafter


def make_llm(model: str, *, multiprocess: bool = False, **kw):
    """A vLLM engine on `model` with the tests' defaults (ENGINE_KW) and `kw`.

    By default the engine runs inside the test process (vLLM's in-process
    engine core and its one-process executor, vllm_bastion.tools.engines):
    starting one takes ~6 s instead of ~40 s of process spawns and imports on
    2 cores, which is most of the suite's time. `multiprocess=True` (and
    TP > 1) starts the engine core and workers as processes, as `vllm.LLM`
    does by default; the server tests always run vLLM's multiprocess path."""
    from vllm_bastion.tools.engines import start_llm

    args = dict(ENGINE_KW)
    args.update(kw)
    in_process = not multiprocess and args.get("tensor_parallel_size", 1) == 1
    return start_llm(model, in_process=in_process, **args)


def shutdown(llm) -> None:
    """Shut an engine down. In-process engines share vLLM's global distributed
    state (world size 1), which vLLM's EngineCore.shutdown tears down: that
    would break the other live in-process engines (the session's reference
    engine), so it is kept; the next engine reuses it."""
    import vllm.v1.engine.core as core

    cleanup = core.cleanup_dist_env_and_memory
    core.cleanup_dist_env_and_memory = lambda *a, **k: None
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        core.cleanup_dist_env_and_memory = cleanup


@pytest.fixture(scope="session")
def reference_llm(tiny_pair):
    """vLLM without speculation: the ground truth for greedy equality."""
    llm = make_llm(tiny_pair[0])
    yield llm
    shutdown(llm)


def bastion_spec(drafter: str, **kw) -> dict:
    return {"method": "bastion", "model": drafter, **kw}


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def spec_metrics(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
    return out
