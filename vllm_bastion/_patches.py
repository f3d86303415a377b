"""Every monkeypatch vllm-bastion applies to vLLM, in one place.

vLLM 0.32 has no extension point for a new speculative method, so BASTION
patches exactly these, each guarded by the version check in `apply()` and
pinned by tests/test_patches.py (which fails if vLLM changes under them):

1. `EngineArgs.create_speculative_config`: accept {"method": "bastion", ...},
   validate it with `BastionConfig`, run the start-up checks that need no
   model, and build vLLM's own DFlash speculative config from it. The
   resolved BASTION config rides along on the drafter's HF config, so every
   process (engine core, workers) sees it.
2. `VllmConfig._get_v2_model_runner_unsupported_features`: BASTION runs on
   the V1 model runner; this makes vLLM pick V1 for it (and refuse a forced V2).
3. `VllmConfig.num_lookahead_tokens` and
   `SpeculativeConfig.max_num_new_slots_for_drafting`: DFlash reserves slots
   for its query block, which BASTION sizes by the draft depth, not by the
   tree budget that `num_speculative_tokens` carries.
4. `SamplingParams._validate_spec_decode`: refuse, per request and with a
   clear message, sampling features the tree walk cannot honour yet.
5. Runner selection: `CPUWorker` builds `CPUModelRunner` inline, so the
   module attribute is swapped for a factory; the GPU `Worker` gets its
   documented `_make_model_runner` hook wrapped. Both build BASTION's runner
   only when the config is a BASTION one; otherwise vLLM is untouched.
6. Structured outputs on trees (scheduler side, vllm_bastion/structured_trees.py):
   `Scheduler.update_draft_token_ids` prunes a structured-output request's
   draft tree with its grammar, `Scheduler.schedule` tells the worker which
   nodes were kept, `StructuredOutputManager.grammar_bitmask` fills one mask
   per tree node. Each acts only on drafts that carry BASTION's tree shape
   (set by BASTION's runner); otherwise it calls vLLM's own code.
7. `AsyncLLM.generate`: run the per-request refusals of 4. (and vLLM's own
   spec-decode refusals) when the request is submitted, not when its output
   stream is first read, so the OpenAI server answers a refused streaming
   request with HTTP 400 before any stream starts (as it does for vLLM's
   own parameter validation), with no traceback in its log.
8. `Scheduler.__init__`: no uniform-decode padding. vLLM pads a new request
   with one token left to compute to 1 + num_speculative_tokens rows of
   placeholder drafts (a shape for FULL CUDA graphs, which BASTION never
   uses); with BASTION num_speculative_tokens is the tree budget, so that
   would verify up to `max_nodes` placeholder rows. The padding is off
   exactly when the scheduler has a per-batch-size draft-length table, so
   BASTION gives it a constant one (the same draft length for every size).
9. `UniProcExecutor` / `MultiprocExecutor` `sample_tokens` and
   `take_draft_token_ids`: without async scheduling the engine core asks the
   workers for the step's drafts in a third RPC after every step (measured
   0.42 ms per step on 2 CPU cores, about 1% of a b1 step, paid even when no
   request drafts). BASTION's runner attaches the same `DraftTokenIds` to its
   sample_tokens output (`DRAFTS_ATTR`); the executor keeps that output and
   answers the engine core's `take_draft_token_ids` from it, with no RPC.
   Outputs without the attribute (any other engine, or a runner that did not
   attach) take vLLM's own path. The worker's draft state is not consumed by
   attaching, so an executor without this patch still gets the same drafts
   through its RPC.
"""

from __future__ import annotations

import functools
from concurrent.futures import Future
from typing import Any

from vllm_bastion.config import (
    BASTION_ATTR,
    BastionConfig,
    BastionConfigError,
    bastion_config_of,
    check_drafter_matches_target,
    check_target_supported,
    read_drafter_config,
)

SUPPORTED_VLLM_MINOR = "0.32."
DRAFTS_ATTR = "bastion_draft_token_ids"  # a sample_tokens output's drafts (patch 9)
WORKER_EXTENSION = "vllm_bastion.stats.BastionWorkerExtension"
_APPLIED = False


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def version_supported() -> bool:
    return vllm_version().startswith(SUPPORTED_VLLM_MINOR)


# ----------------------------------------------------------------- markers


def _is_bastion_request(raw: dict | None, spec_method: str | None) -> bool:
    if spec_method == "bastion":
        return True
    return isinstance(raw, dict) and raw.get("method") == "bastion"


# ----------------------------------------------------------------- 1. config


def _create_speculative_config(orig, self, target_model_config, target_parallel_config):
    raw = self.speculative_config
    if not _is_bastion_request(raw, getattr(self, "spec_method", None)):
        return orig(self, target_model_config, target_parallel_config)
    if not version_supported():
        raise BastionConfigError(
            f"vllm-bastion supports vLLM {SUPPORTED_VLLM_MINOR}x, but vLLM "
            f"{vllm_version()} is installed. Install a matching vllm-bastion or "
            f"vllm=={SUPPORTED_VLLM_MINOR}*."
        )
    user = dict(raw or {})
    for flag, key in (("spec_method", "method"), ("spec_model", "model")):
        val = getattr(self, flag, None)
        if val is not None:
            if key in user and user[key] != val:
                raise BastionConfigError(
                    f"--{flag.replace('_', '-')} and --speculative-config['{key}'] "
                    "are mutually exclusive"
                )
            user[key] = val
    if getattr(self, "spec_tokens", None) is not None:
        raise BastionConfigError(
            "--spec-tokens is not supported with method 'bastion': BASTION sizes "
            "its trees itself; use 'max_nodes' in --speculative-config instead."
        )
    cfg = BastionConfig.from_user_dict(user)

    target = _target_dict(target_model_config)
    check_target_supported(target)
    _check_engine_args(self, target_model_config, target_parallel_config)
    drafter = read_drafter_config(cfg.model, cfg.revision)
    check_drafter_matches_target(drafter, target, drafter_name=f"The drafter {cfg.model!r}")
    if drafter.get("draft_vocab_size") not in (None, drafter.get("vocab_size")):
        raise BastionConfigError(
            f"The drafter {cfg.model!r} uses a reduced draft vocabulary "
            "(draft_vocab_size); BASTION needs a drafter over the full target "
            "vocabulary."
        )
    if cfg.device_profile is not None:
        _check_device_profile(cfg.device_profile)
    resolved = cfg.model_copy(update={"draft_depth": cfg.resolved_depth(drafter)})

    translated = {
        **cfg.vllm_passthrough(),
        "method": "dflash",
        "num_speculative_tokens": cfg.max_nodes,
    }
    if self.async_scheduling:
        raise BastionConfigError(
            "BASTION does not support async scheduling yet; remove "
            "--async-scheduling (BASTION turns it off by itself)."
        )
    self.async_scheduling = False
    _use_piecewise_cuda_graphs(self)
    if not target_parallel_config.worker_extension_cls:
        # adds the `bastion_stats` collective RPC to the workers
        target_parallel_config.worker_extension_cls = WORKER_EXTENSION
    # vLLM's method reads the dict from `self` (and mutates it); restore the
    # user's dict afterwards so the call stays repeatable.
    saved = (self.speculative_config, self.spec_method, self.spec_model)
    self.speculative_config, self.spec_method, self.spec_model = translated, None, None
    try:
        spec = orig(self, target_model_config, target_parallel_config)
    finally:
        self.speculative_config, self.spec_method, self.spec_model = saved
    hf = spec.draft_model_config.hf_config
    setattr(hf, BASTION_ATTR, resolved.model_dump())
    # the worker's tree statistics reach this process's /metrics through a file
    from vllm_bastion import metrics

    stats_file = metrics.new_stats_file()
    setattr(hf, metrics.STATS_FILE_ATTR, stats_file)
    served = getattr(target_model_config, "served_model_name", None) or target_model_config.model
    metrics.register_stats_file(stats_file, served if isinstance(served, str) else served[0])
    return spec


def _use_piecewise_cuda_graphs(args) -> None:
    """FULL CUDA graphs would replay attention without BASTION's tree step.

    Piecewise graphs keep attention outside the captured pieces, where the
    tree-attention kernel runs. (On CPU vLLM captures no graphs.)
    """
    from vllm.config.compilation import CUDAGraphMode

    cc = args.compilation_config
    mode = getattr(cc, "cudagraph_mode", None)
    if mode is None:
        cc.cudagraph_mode = CUDAGraphMode.PIECEWISE
    elif mode.has_full_cudagraphs():
        raise BastionConfigError(
            f"BASTION does not support cudagraph_mode {mode.name} yet (FULL graphs "
            "would replay attention without the tree step); use PIECEWISE or NONE, "
            "or leave it unset."
        )


def _check_device_profile(name: str) -> None:
    import os

    from vllm_bastion.profiles import load_device_prior, load_device_priors
    if os.path.isfile(name):
        return
    if load_device_prior(name).fallback and "cpu" not in name.lower():
        known = sorted(p.name for p in load_device_priors())
        raise BastionConfigError(
            f"device_profile {name!r} is neither a file nor a known device; known "
            f"devices: {known} (or pass a path to a roofline prior JSON)."
        )


def _target_dict(model_config) -> dict:
    hf = getattr(model_config, "hf_text_config", None) or model_config.hf_config
    d = hf.to_dict()
    if "architectures" not in d or not d["architectures"]:
        d["architectures"] = list(getattr(model_config.hf_config, "architectures", []) or [])
    return d


def _check_engine_args(args, model_config, parallel_config) -> None:
    """Engine-level combinations BASTION refuses before any model loads."""
    problems = []
    if getattr(model_config, "is_hybrid", False) or getattr(
        model_config, "is_attention_free", False
    ):
        problems.append(
            "a hybrid or attention-free target (tree verification of recurrent "
            "state is not supported; use a pure-attention target)"
        )
    if getattr(model_config, "uses_mrope", False):
        problems.append("an M-RoPE (multimodal position) target")
    if getattr(model_config, "logits_processors", None):
        problems.append("custom logits processors (--logits-processors)")
    if parallel_config.pipeline_parallel_size > 1:
        problems.append("pipeline parallelism (--pipeline-parallel-size > 1)")
    if getattr(parallel_config, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallelism")
    if getattr(args, "kv_transfer_config", None) is not None:
        problems.append("KV transfer connectors (--kv-transfer-config)")
    if getattr(args, "enable_lora", False):
        problems.append("LoRA adapters (--enable-lora)")
    if str(getattr(args, "kv_cache_dtype", "auto")) not in ("auto", "None", "bfloat16", "float16", "float32"):
        problems.append(f"a quantized KV cache (--kv-cache-dtype {args.kv_cache_dtype})")
    if getattr(parallel_config, "enable_dbo", False) or getattr(args, "enable_dbo", False):
        problems.append("dual-batch overlap (--enable-dbo)")
    if problems:
        raise BastionConfigError(
            "BASTION tree speculative decoding does not support "
            + "; ".join(problems)
            + " yet. Remove it, or serve without method 'bastion'."
        )


# ----------------------------------------------------------------- 2./3. sizes


def _v2_unsupported(orig, self):
    features = list(orig(self))
    if bastion_config_of(self) is not None:
        features.append("BASTION tree speculative decoding")
    return features


def _num_lookahead_tokens(orig_fget, self):
    cfg = bastion_config_of(self)
    if cfg is not None:
        return cfg.draft_depth + 1  # the DFlash query block: bonus + D masks
    return orig_fget(self)


def _max_num_new_slots_for_drafting(orig_fget, self):
    cfg = bastion_config_of(self)
    if cfg is not None:
        return cfg.draft_depth
    return orig_fget(self)


# ----------------------------------------------------------------- 4. requests

UNSUPPORTED_REQUEST_FEATURES = (
    # (predicate, name shown to the user). Everything else vLLM's own
    # speculative decoding accepts is supported per tree node (processing.py,
    # structured_trees.py); vLLM itself refuses min_p and logit_bias.
    (lambda p: getattr(p, "thinking_token_budget", None) is not None, "thinking_token_budget"),
)


def _validate_spec_decode(orig, self, speculative_config):
    orig(self, speculative_config)
    if speculative_config is None or bastion_config_of(speculative_config) is None:
        return
    bad = [name for pred, name in UNSUPPORTED_REQUEST_FEATURES if pred(self)]
    if bad:
        from vllm.exceptions import VLLMValidationError

        raise VLLMValidationError(
            "BASTION tree speculative decoding does not support "
            f"{', '.join(bad)} yet; remove {'it' if len(bad) == 1 else 'them'} from "
            "the request, or serve the model without method 'bastion'."
        )


# ----------------------------------------------------------------- 5. runners


def _make_cpu_runner_factory(orig_cls):
    def CPUModelRunner(vllm_config, device):  # noqa: N802 - stands in for the class
        if bastion_config_of(vllm_config) is not None:
            from vllm_bastion.runner import BastionCPUModelRunner

            return BastionCPUModelRunner(vllm_config, device)
        return orig_cls(vllm_config, device)

    CPUModelRunner.__wrapped_runner__ = orig_cls  # type: ignore[attr-defined]
    return CPUModelRunner


def _make_model_runner(orig, self):
    if bastion_config_of(self.vllm_config) is not None and not self.use_v2_model_runner:
        from vllm_bastion.runner import BastionGPUModelRunner

        return BastionGPUModelRunner(self.vllm_config, self.device)
    return orig(self)


# ----------------------------------------------------------------- 6. structured outputs


def _apply_structured_output_patches() -> None:
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_bastion import structured_trees as st

    _wrap_method(Scheduler, "update_draft_token_ids", st.update_draft_token_ids)
    _wrap_method(Scheduler, "schedule", st.schedule)
    _wrap_method(StructuredOutputManager, "grammar_bitmask", st.grammar_bitmask)


# ----------------------------------------------------------------- 7. submission


def _generate_refusing_early(orig):
    """AsyncLLM.generate is an async generator: nothing in it runs (and so no
    request is validated) until the caller first reads it, which the OpenAI
    server does after it has answered 200 for a streaming request. This
    plain function validates first, then returns the same generator."""

    @functools.wraps(orig)
    def generate(self, prompt, sampling_params, request_id, *args, **kwargs):
        spec = getattr(getattr(self, "vllm_config", None), "speculative_config", None)
        if spec is not None and bastion_config_of(spec) is not None:
            from vllm.sampling_params import SamplingParams

            if isinstance(sampling_params, SamplingParams):
                sampling_params._validate_spec_decode(spec)  # VLLMValidationError -> 400
        return orig(self, prompt, sampling_params, request_id, *args, **kwargs)

    generate.__bastion_patched__ = True  # type: ignore[attr-defined]
    return generate


# ----------------------------------------------------------------- 8. scheduler


class _SameDraftLength:
    """A per-batch-size draft-length table with one entry for every size."""

    def __init__(self, n: int):
        self.n = n

    def __getitem__(self, batch_size: int) -> int:
        return self.n


def _scheduler_init(orig, self, vllm_config, *args, **kwargs):
    orig(self, vllm_config, *args, **kwargs)
    if bastion_config_of(vllm_config) is not None and self.dynamic_sd_lookup is None:
        self.dynamic_sd_lookup = _SameDraftLength(self.num_spec_tokens)


def _sample_tokens_keeping_output(orig, self, *args, **kwargs):
    out = orig(self, *args, **kwargs)
    self._bastion_sampled = out  # a ModelRunnerOutput, a Future of one, or None
    return out


def _take_draft_token_ids_from_output(orig, self):
    out = self.__dict__.pop("_bastion_sampled", None)
    if isinstance(out, Future):
        out = out.result()  # non-blocking sample_tokens: the engine core already waited on it
    if out is not None and DRAFTS_ATTR in getattr(out, "__dict__", {}):
        return out.__dict__.pop(DRAFTS_ATTR)
    return orig(self)


def _apply_draft_handoff_patches() -> None:
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor

    for cls in (UniProcExecutor, MultiprocExecutor):
        _wrap_method(cls, "sample_tokens", _sample_tokens_keeping_output)
        _wrap_method(cls, "take_draft_token_ids", _take_draft_token_ids_from_output)


# ----------------------------------------------------------------- apply


def _wrap_method(cls, name, wrapper):
    orig = getattr(cls, name)
    if getattr(orig, "__bastion_patched__", False):
        return

    @functools.wraps(orig)
    def patched(self, *args, **kwargs):
        return wrapper(orig, self, *args, **kwargs)

    patched.__bastion_patched__ = True  # type: ignore[attr-defined]
    setattr(cls, name, patched)


def _wrap_property(cls, name, wrapper):
    prop = cls.__dict__[name]
    if getattr(prop.fget, "__bastion_patched__", False):
        return

    def fget(self):
        return wrapper(prop.fget, self)

    fget.__bastion_patched__ = True  # type: ignore[attr-defined]
    setattr(cls, name, property(fget, prop.fset, prop.fdel, prop.__doc__))


def apply() -> None:
    """Apply every patch once per process (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    from vllm.config import SpeculativeConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams

    # The config patch is applied on any vLLM so that method 'bastion' on an
    # unsupported vLLM fails with a message naming the version problem.
    _wrap_method(EngineArgs, "create_speculative_config", _create_speculative_config)
    if not version_supported():
        _APPLIED = True
        return
    _wrap_method(VllmConfig, "_get_v2_model_runner_unsupported_features", _v2_unsupported)
    _wrap_property(VllmConfig, "num_lookahead_tokens", _num_lookahead_tokens)
    _wrap_property(
        SpeculativeConfig, "max_num_new_slots_for_drafting", _max_num_new_slots_for_drafting
    )
    _wrap_method(SamplingParams, "_validate_spec_decode", _validate_spec_decode)
    _apply_structured_output_patches()
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.async_llm import AsyncLLM

    if not getattr(AsyncLLM.generate, "__bastion_patched__", False):
        AsyncLLM.generate = _generate_refusing_early(AsyncLLM.generate)
    _wrap_method(Scheduler, "__init__", _scheduler_init)
    _apply_draft_handoff_patches()

    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        # importing cpu_worker on a GPU host would stub out CUDA APIs
        import vllm.v1.worker.cpu_worker as cpu_worker

        if not hasattr(cpu_worker.CPUModelRunner, "__wrapped_runner__"):
            cpu_worker.CPUModelRunner = _make_cpu_runner_factory(cpu_worker.CPUModelRunner)
    else:
        from vllm.v1.worker.gpu_worker import Worker

        _wrap_method(Worker, "_make_model_runner", _make_model_runner)
    _APPLIED = True
