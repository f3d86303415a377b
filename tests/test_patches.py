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
