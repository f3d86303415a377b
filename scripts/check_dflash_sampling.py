"""vLLM's own DFlash chain (method "dflash", no BASTION) at T > 0 vs greedy:
mean accepted length on 4 held-out stdlib prompts, batch 1, 96 tokens.

    VLLM_PLUGINS=none python scripts/check_dflash_sampling.py   # without the plugin's patches

On vLLM 0.32 / CPU (2026-12-02) the chain accepts almost nothing once a
request samples (T = 0.3: 1-4 of ~378 drafts; T = 1: 3-9), with or without
the plugin loaded, while greedy accepts 1.43 per step; see docs/replay.md.
"""

import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")


def main() -> None:
    from vllm import LLM, SamplingParams

    from vllm_bastion.tools.benchmark import spec_counters, speculative_config
    from vllm_bastion.tools.replay_record import prompt_set
    from vllm_bastion.tools.training import default_pair_paths

    target, drafter = default_pair_paths()
    prompts, _ = prompt_set("stdlib", target, 4)
    llm = LLM(model=target, max_model_len=2048, seed=0, enforce_eager=True, max_num_seqs=4, disable_log_stats=False,
              speculative_config=speculative_config("dflash", drafter, 15, None))
    runs = [("T=1, seeded", dict(temperature=1.0, seed=1)), ("T=1", dict(temperature=1.0)),
            ("T=0.3", dict(temperature=0.3)), ("greedy", dict(temperature=0.0))]
    try:
        for label, kw in runs:
            sp = SamplingParams(max_tokens=96, ignore_eos=True, **kw)
            b = spec_counters(llm)
            for p in prompts:
                llm.generate([{"prompt_token_ids": list(p)}], sp, use_tqdm=False)
            a = spec_counters(llm)
            drafts = a["vllm:spec_decode_num_drafts"] - b.get("vllm:spec_decode_num_drafts", 0)
            acc = a["vllm:spec_decode_num_accepted_tokens"] - b.get("vllm:spec_decode_num_accepted_tokens", 0)
            print(f"{label}: {drafts} steps, {acc} drafts accepted, mean accepted length {1 + acc / drafts:.4f}",
                  flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
