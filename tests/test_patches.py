"""Pins the vLLM internals vllm-bastion patches or overrides.

If vLLM changes any of these (a new minor version, a refactor of the V1
runner), this module fails first, naming what moved, instead of the engine
failing obscurely.
"""

import inspect

import pytest

import vllm
from vllm_bastion import _patches


def params(fn):
    return list(inspect.signature(fn).parameters)


def test_vllm_minor_version_is_pinned():
    assert vllm.__version__.startswith(_patches.SUPPORTED_VLLM_MINOR), vllm.__version__
    assert _patches.version_supported()


def test_plugin_entry_point_is_registered():
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "bastion"]
    assert eps and eps[0].value == "vllm_bastion.plugin:register"


def test_config_hooks_exist_with_expected_signatures():
    from vllm.config import SpeculativeConfig, VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.sampling_params import SamplingParams

    assert params(EngineArgs.create_speculative_config) == [
        "self", "target_model_config", "target_parallel_config"]
    for field in ("speculative_config", "spec_method", "spec_model", "spec_tokens",
                  "async_scheduling", "enable_lora", "kv_cache_dtype", "kv_transfer_config"):
        assert field in EngineArgs.__dataclass_fields__, field
    assert params(VllmConfig._get_v2_model_runner_unsupported_features) == ["self"]
    assert isinstance(VllmConfig.__dict__["num_lookahead_tokens"], property)
    assert isinstance(SpeculativeConfig.__dict__["max_num_new_slots_for_drafting"], property)
    assert params(SamplingParams._validate_spec_decode) == ["self", "speculative_config"]
    assert "worker_extension_cls" in __import__("vllm.config", fromlist=["ParallelConfig"]).ParallelConfig.__dataclass_fields__


def test_patches_are_applied_in_this_process():
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs

    _patches.apply()
    assert getattr(EngineArgs.create_speculative_config, "__bastion_patched__", False)
    assert getattr(VllmConfig._get_v2_model_runner_unsupported_features, "__bastion_patched__", False)
    import vllm.v1.worker.cpu_worker as cpu_worker

    assert hasattr(cpu_worker.CPUModelRunner, "__wrapped_runner__")
    # CPUWorker builds its runner by this module-level name
    assert "CPUModelRunner(" in inspect.getsource(cpu_worker.CPUWorker.init_device)


RUNNER_HOOKS = {
    "_prepare_inputs": ["self", "scheduler_output", "num_scheduled_tokens"],
    "_sample": ["self", "logits", "spec_decode_metadata"],
    "_build_attention_metadata": None,
    "execute_model": ["self", "scheduler_output", "intermediate_tensors"],
    "propose_draft_token_ids": [
        "self", "scheduler_output", "sampled_token_ids", "sampling_metadata", "hidden_states",
        "sample_hidden_states", "aux_hidden_states", "spec_decode_metadata",
        "common_attn_metadata", "slot_mappings"],
    "_bookkeeping_sync": None,
    "_copy_draft_token_ids_to_cpu": ["self", "scheduler_output", "zeros_only"],
    "_input_fits_in_drafter": ["self", "common_attn_metadata"],
    "load_model": None,
}


@pytest.mark.parametrize("name", sorted(RUNNER_HOOKS))
def test_v1_runner_hooks(name):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    fn = getattr(GPUModelRunner, name)
    if RUNNER_HOOKS[name] is not None:
        assert params(fn) == RUNNER_HOOKS[name]


def test_v1_runner_internals_bastion_reads():
    from vllm.v1.worker.gpu_model_runner import ExecuteModelState, GPUModelRunner

    assert "aux_hidden_states" in ExecuteModelState._fields
    assert "slot_mappings" in ExecuteModelState._fields
    src = inspect.getsource(GPUModelRunner.sample_tokens)
    # the order BASTION relies on: sample (walk + compaction) before drafting
    assert src.index("self._sample(") < src.index("propose_draft_token_ids(")
    assert "self.execute_model_state = None" in src
    src = inspect.getsource(GPUModelRunner._prepare_inputs)
    assert src.index("compute_slot_mapping(") < src.index("_calc_spec_decode_metadata(")


def test_dflash_proposer_hooks():
    from vllm.v1.spec_decode.dflash import DFlashProposer
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    assert params(SpecDecodeBaseProposer._sample_draft_tokens) == ["self", "hidden_states", "sampling_metadata"]
    src = inspect.getsource(SpecDecodeBaseProposer.propose)
    assert "self.num_speculative_tokens = num_speculative_tokens" in src
    assert "self._sample_draft_tokens(" in src
    assert params(DFlashProposer.__init__) == ["self", "vllm_config", "device", "runner"]


def test_attention_impl_contract():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl

    assert params(CPUAttentionBackendImpl.forward)[:8] == [
        "self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"]
    assert params(CPUAttentionBackendImpl.do_kv_cache_update) == [
        "self", "layer", "key", "value", "kv_cache", "slot_mapping"]
    from vllm_bastion.tree_attention import tree_impl_class

    sub = tree_impl_class(CPUAttentionBackendImpl)
    obj = CPUAttentionBackendImpl.__new__(CPUAttentionBackendImpl)
    obj.__class__ = sub  # the impl class swap BASTION does at load time
    assert isinstance(obj, CPUAttentionBackendImpl)


def test_sampling_feature_internals_bastion_reads():
    """What per-node processing (processing.py) and structured outputs on
    trees (structured_trees.py) read or wrap in vLLM."""
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import DraftTokenIds
    from vllm.v1.sample.logits_processor.builtin import MinTokensLogitsProcessor
    from vllm.v1.sample.metadata import SamplingMetadata
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.structured_output import StructuredOutputManager
    from vllm.v1.structured_output.backend_types import StructuredOutputGrammar
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _patches.apply()
    # the sampler's order BASTION replays per node
    src = inspect.getsource(Sampler.apply_logits_processors)
    assert (src.index("allowed_token_ids_mask") < src.index("apply_bad_words(")
            < src.index("non_argmax_invariant") < src.index("apply_penalties("))
    assert "apply_repetition_penalties(" in inspect.getsource(
        __import__("vllm.model_executor.layers.utils", fromlist=["x"]).apply_penalties)
    assert params(Sampler.gather_logprobs) == ["logprobs", "num_logprobs", "token_ids"]
    assert params(Sampler.gather_specific_token_logprobs) == [
        "self", "logprobs", "logprob_token_ids", "sampled"]
    for f in ("no_penalties", "prompt_token_ids", "allowed_token_ids_mask", "max_num_logprobs",
              "logprob_token_ids", "logitsprocs", "repetition_penalties"):
        assert f in SamplingMetadata.__dataclass_fields__, f
    for attr in ("token_ids_cpu", "num_tokens_no_spec", "num_prompt_tokens",
                 "repetition_penalties_cpu", "frequency_penalties_cpu",
                 "presence_penalties_cpu", "bad_words_token_ids"):
        assert f"self.{attr}" in inspect.getsource(InputBatch.__init__), attr
    assert "self.min_toks" in inspect.getsource(MinTokensLogitsProcessor.__init__)
    # structured outputs: the wrapped scheduler methods and the grammar API walked per node
    assert params(Scheduler.update_draft_token_ids) == ["self", "draft_token_ids"]
    assert getattr(Scheduler.update_draft_token_ids, "__bastion_patched__", False)
    assert getattr(Scheduler.schedule, "__bastion_patched__", False)
    assert params(StructuredOutputManager.grammar_bitmask) == [
        "self", "requests", "structured_output_request_ids", "scheduled_spec_decode_tokens"]
    assert getattr(StructuredOutputManager.grammar_bitmask, "__bastion_patched__", False)
    assert params(StructuredOutputManager._get_constraint_bounds)[:3] == [
        "self", "request", "spec_tokens"]
    for m in ("accept_tokens", "validate_tokens", "rollback", "fill_bitmask", "is_terminated"):
        assert hasattr(StructuredOutputGrammar, m), m
    assert "scheduled_spec_decode_tokens" in SchedulerOutput.__dataclass_fields__
    # the runner looks for trees to send only in steps that schedule such requests
    assert "has_structured_output_requests" in SchedulerOutput.__dataclass_fields__
    assert list(DraftTokenIds.__dataclass_fields__) == ["req_ids", "draft_token_ids"]
    assert "apply_grammar_bitmask(" in inspect.getsource(GPUModelRunner.sample_tokens)
    assert params(GPUModelRunner.take_draft_token_ids) == ["self"]


# ------------------------------------------------- 7. refusals before the stream


def _bastion_spec_config():
    """A stand-in SpeculativeConfig carrying a resolved BASTION config."""
    from types import SimpleNamespace

    from vllm_bastion.config import BASTION_ATTR, BastionConfig

    hf = SimpleNamespace(**{BASTION_ATTR: BastionConfig(model="drafter").model_dump()})
    return SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf))


def test_generate_is_the_lazy_async_generator_the_server_reads_after_200():
    import vllm.entrypoints.openai.chat_completion.serving as chat
    import vllm.entrypoints.openai.completion.serving as completion
    from vllm.v1.engine.async_llm import AsyncLLM

    _patches.apply()
    orig = AsyncLLM.generate.__wrapped__
    assert inspect.isasyncgenfunction(orig)  # why the refusal used to come after 200
    assert params(orig)[:4] == ["self", "prompt", "sampling_params", "request_id"]
    for module in (completion, chat):  # called without await; read after the 200
        assert "generator = self.engine_client.generate(" in inspect.getsource(module)


def test_generate_refuses_before_returning_the_stream():
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import SamplingParams
    from vllm.v1.engine.async_llm import AsyncLLM

    _patches.apply()
    engine = SimpleNamespace(vllm_config=SimpleNamespace(speculative_config=_bastion_spec_config()))
    for bad, name in ((SamplingParams(min_p=0.3), "min_p"),  # vLLM's own spec-decode refusal
                      (SamplingParams(thinking_token_budget=8), "BASTION")):  # BASTION's
        with pytest.raises(VLLMValidationError, match=name):
            AsyncLLM.generate(engine, "x", bad, "r1")  # raises on the call itself
    gen = AsyncLLM.generate(engine, "x", SamplingParams(), "r2")
    assert inspect.isasyncgen(gen)  # accepted requests: vLLM's generator, unread
    gen.aclose().close()
    plain = SimpleNamespace(vllm_config=SimpleNamespace(speculative_config=None))
    gen = AsyncLLM.generate(plain, "x", SamplingParams(min_p=0.3), "r3")  # not BASTION: untouched
    assert inspect.isasyncgen(gen)
    gen.aclose().close()


# ------------------------------------------------- 8. no uniform-decode padding


def test_scheduler_pads_new_decodes_only_without_a_draft_length_table():
    from vllm.v1.core.sched.scheduler import Scheduler

    src = inspect.getsource(Scheduler)
    # the padding condition BASTION switches off ...
    assert "(self.num_spec_tokens > 0 and self.dynamic_sd_lookup is None)" in src
    assert "padded_num_tokens = 1 + self.num_spec_tokens" in src
    # ... and the table's only other reader: the draft length sent to workers
    assert src.count("self.dynamic_sd_lookup[") == 1
    assert "self.dynamic_sd_lookup[\n                len(num_scheduled_tokens)" in src
    assert "self.dynamic_sd_lookup: list[int] | None = None" in src
    assert params(Scheduler.__init__)[:2] == ["self", "vllm_config"]


def test_scheduler_gets_a_constant_draft_length_table():
    from types import SimpleNamespace

    def orig(self, vllm_config, *args, **kwargs):
        self.num_spec_tokens, self.dynamic_sd_lookup = 64, None

    sched = SimpleNamespace()
    _patches._scheduler_init(orig, sched, SimpleNamespace(speculative_config=_bastion_spec_config()))
    assert sched.dynamic_sd_lookup is not None
    assert [sched.dynamic_sd_lookup[b] for b in (1, 7, 256)] == [64, 64, 64]
    other = SimpleNamespace()
    _patches._scheduler_init(orig, other, SimpleNamespace(speculative_config=None))
    assert other.dynamic_sd_lookup is None  # vLLM's own behaviour elsewhere


# ------------------------------------------------- 9. drafts handed over with the sampled output


def test_engine_core_takes_drafts_from_the_executor_after_each_step():
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.executor.uniproc_executor import UniProcExecutor
    from vllm.v1.outputs import ModelRunnerOutput

    _patches.apply()
    src = inspect.getsource(EngineCore.post_step)
    assert "self.model_executor.take_draft_token_ids()" in src
    assert "self.model_executor.sample_tokens(grammar_output)" in inspect.getsource(EngineCore.step)
    for cls in (UniProcExecutor, MultiprocExecutor):
        assert params(cls.sample_tokens)[:2] == ["self", "grammar_output"], cls
        assert params(cls.take_draft_token_ids) == ["self"], cls
        assert getattr(cls.sample_tokens, "__bastion_patched__", False), cls
        assert getattr(cls.take_draft_token_ids, "__bastion_patched__", False), cls
    # the runner tags the output object: it must carry instance attributes through pickle
    out = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    setattr(out, _patches.DRAFTS_ATTR, "drafts")
    import pickle

    assert getattr(pickle.loads(pickle.dumps(out)), _patches.DRAFTS_ATTR) == "drafts"


def test_take_draft_token_ids_answers_from_the_sampled_output_once():
    from types import SimpleNamespace

    rpcs = []

    def orig_take(self):
        rpcs.append("take")
        return "from rpc"

    executor = SimpleNamespace()
    tagged = SimpleNamespace(**{_patches.DRAFTS_ATTR: "from output"})
    _patches._sample_tokens_keeping_output(lambda self, g: tagged, executor, None)
    assert _patches._take_draft_token_ids_from_output(orig_take, executor) == "from output"
    assert rpcs == []
    # nothing kept (a step without sample_tokens) or an untagged output: vLLM's RPC
    assert _patches._take_draft_token_ids_from_output(orig_take, executor) == "from rpc"
    _patches._sample_tokens_keeping_output(lambda self, g: SimpleNamespace(), executor, None)
    assert _patches._take_draft_token_ids_from_output(orig_take, executor) == "from rpc"
    assert rpcs == ["take", "take"]
