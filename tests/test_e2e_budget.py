"""The cost-aware budget inside real engines: the latency model drives tree sizes.

* `python -m vllm_bastion.calibrate` probes the target on this CPU and caches
  the fit; a BASTION engine started afterwards reuses it (no second probe).
* The same prompts on a fake, infinitely fast device profile grow every tree
  to max_nodes; on a fake compute-starved device every tree is the root alone
  (speculation switches itself off); this CPU's calibrated model lands in
  between. Outputs stay identical to vLLM without speculation throughout.
"""

import json
import os
import subprocess
import sys
from contextlib import contextmanager

import pytest
from conftest import bastion_spec, make_llm, shutdown, token_ids
from prompts import mixed_prompts

from vllm import SamplingParams
from vllm_bastion.config import BastionConfig, read_drafter_config
from vllm_bastion.tools.oracle import install_second_choice_oracle

MAX_NODES = 24
GREEDY = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)


def _prior(path, name, flops, bw):
    json.dump({"name": name, "match": [name], "peak_flops": {"fp32": flops, "bf16": flops},
               "memory_bandwidth": bw, "source": "test"}, open(path, "w"))
    return str(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("budget")
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")  # engines and CLI inherit it
    yield {
        "fast": _prior(root / "fast.json", "Fake infinitely fast accelerator", 1e21, 1e19),
        # compute-starved: every verified token costs seconds, so no node can pay
        # (a device slow in memory too would be memory-bound, where nodes are cheap)
        "slow": _prior(root / "slow.json", "Fake compute-starved accelerator", 1e6, 1e19),
        "cache": root / "cache" / "vllm_bastion" / "profiles.json",
    }
    if old is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = old


@contextmanager
def engine(target, drafter, multiprocess=False, **spec):
    llm = make_llm(target, multiprocess=multiprocess,
                   speculative_config=bastion_spec(drafter, max_nodes=MAX_NODES, **spec))
    try:
        yield llm
    finally:
        shutdown(llm)


def run(llm, prompts, refs):
    llm.collective_rpc(install_second_choice_oracle, args=(refs,))
    out = token_ids(llm.generate(prompts, GREEDY, use_tqdm=False))
    return out, llm.collective_rpc("bastion_stats")[0]


def test_latency_model_drives_tree_sizes(tiny_pair, reference_llm, env):
    target, drafter = tiny_pair
    prompts = mixed_prompts(4, seed=21)
    ref_outs = reference_llm.generate(prompts, GREEDY, use_tqdm=False)
    ref = token_ids(ref_outs)
    refs = {tuple(o.prompt_token_ids): r for o, r in zip(ref_outs, ref)}

    # 1. the CLI calibrates this CPU and caches the fit
    cli = subprocess.run(
        [sys.executable, "-m", "vllm_bastion.calibrate", "--model", target, "--drafter", drafter,
         "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager"],
        capture_output=True, text=True, timeout=600, env=dict(os.environ),
    )
    assert cli.returncode == 0, cli.stdout[-2000:] + cli.stderr[-3000:]
    assert "predicted vs measured" in cli.stdout and "MAPE" in cli.stdout
    assert "a_c =" in cli.stdout and "b_m =" in cli.stdout
    assert env["cache"].exists()

    # 2. a BASTION engine on this CPU reuses the cached fit (a multiprocess
    # engine like the CLI's: the fit is keyed by the worker's thread count)
    with engine(target, drafter, multiprocess=True) as llm:
        cpu_out, cpu = run(llm, prompts, refs)
    assert cpu["budget"]["source"].startswith("cached fit"), cpu["budget"]
    assert cpu_out == ref
    # the chain-exact CPU path's branch waves are counted and timed, so the
    # plan can price them (EngineBudget.wave_cost)
    assert cpu["time_per_step"]["branch_waves"] > 0 and cpu["budget"]["wave_s"] > 0, cpu["budget"]

    # 3. fake devices: verification free -> full trees; very expensive -> none
    # (the fast engine drafts the drafter's whole block every step: adaptive_depth off)
    with engine(target, drafter, device_profile=env["fast"], calibrate=False, online_refit=False,
                adaptive_depth=False) as llm:
        fast_out, fast = run(llm, prompts, refs)
    with engine(target, drafter, device_profile=env["slow"], calibrate=False, online_refit=False) as llm:
        slow_out, slow = run(llm, prompts, refs)
    assert fast_out == slow_out == ref

    assert fast["mean_nodes"] == MAX_NODES, fast
    assert slow["trees"] == 0 and slow["budget"]["mean_planned_nodes"] == 0, slow
    assert 0 < cpu["budget"]["mean_planned_nodes"] < fast["budget"]["mean_planned_nodes"]
    assert cpu["mean_nodes"] < fast["mean_nodes"]
    # the drafter's depth follows the planned trees (core/draft_depth.py):
    # small trees on this CPU, a shorter query block; the full block without it
    depth = BastionConfig(model=drafter, max_nodes=MAX_NODES).resolved_depth(read_drafter_config(drafter))
    assert fast["mean_block_depth"] == depth, fast
    assert 1 <= cpu["mean_block_depth"] < depth, cpu
    assert cpu["budget"]["device"].startswith("Generic CPU") or "CPU" in cpu["budget"]["device"]
    assert fast["budget"]["device"] == "Fake infinitely fast accelerator"
