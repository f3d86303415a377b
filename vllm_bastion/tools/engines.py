"""Starting offline vLLM engines for the main job, benchmarks and tests
(offline tooling): vLLM's default multiprocess engine, or its in-process one.

vLLM's `LLM` starts an engine-core process and a worker process by default;
on 2 CPU cores their spawns and imports cost ~30 s per engine and the
shutdown ~5 s more. `in_process=True` runs both inside the calling process
(vLLM's in-process engine core, `VLLM_ENABLE_V1_MULTIPROCESSING=0`, and its
one-process executor `distributed_executor_backend="uni"`): same model
runner and plugin hooks, no spawns. Tensor parallelism needs workers, so it
is multiprocess only.
"""

from __future__ import annotations

import gc
import os

_MP = "VLLM_ENABLE_V1_MULTIPROCESSING"


def start_llm(model: str, *, in_process: bool = False, **kw):
    """`vllm.LLM(model=model, **kw)`, in this process if `in_process`."""
    from vllm import LLM, envs

    if in_process and kw.get("tensor_parallel_size", 1) != 1:
        raise ValueError("an in-process engine has one worker: tensor_parallel_size must be 1 "
                         "(start it with in_process=False)")
    if in_process:
        kw.setdefault("distributed_executor_backend", "uni")
    # an in-process engine freezes the GC heap at start-up: let engines shut
    # down earlier be collected (their KV caches) before this one freezes it
    gc.unfreeze()
    gc.collect()
    old = os.environ.get(_MP)
    os.environ[_MP] = "0" if in_process else "1"
    try:  # read while the engine starts; everything else keeps vLLM's default
        return LLM(model=model, **kw)
    finally:
        if old is None:
            os.environ.pop(_MP, None)
        else:
            os.environ[_MP] = old
        # an in-process engine starts caching vLLM's env vars: read them afresh
        envs.disable_envs_cache()
