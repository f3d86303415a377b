"""Bad BASTION configurations fail at start-up, before any model loads, with an
error that names the problem (and usually the fix)."""

import json
import os
import shutil

import pytest

from vllm_bastion.config import BastionConfig, BastionConfigError


def _copy_drafter(src, dst, **overrides):
    shutil.copytree(src, dst)
    cfg = json.load(open(os.path.join(dst, "config.json")))
    for k, v in overrides.items():
        if k == "dflash_config":
            cfg["dflash_config"] = {**cfg["dflash_config"], **v}
        elif v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


def _hybrid_target(src, dst):
    os.makedirs(dst)
    for f in os.listdir(src):
        if f.startswith("token") or f.endswith(".jinja"):
            shutil.copy(os.path.join(src, f), dst)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg.update(
        architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next",
        layer_types=["linear_attention", "full_attention"] * 2, linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
        linear_conv_kernel_dim=4, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=64, decoder_sparse_step=1, full_attention_interval=2,
    )
    json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
    return dst


@pytest.fixture(scope="module")
def bad(tiny_pair, tmp_path_factory):
    target, drafter = tiny_pair
    root = tmp_path_factory.mktemp("bad")
    empty = root / "empty"
    empty.mkdir()
    return {
        "target": target,
        "drafter": drafter,
        "empty": str(empty),
        "vocab": _copy_drafter(drafter, str(root / "vocab"), vocab_size=999),
        "hidden": _copy_drafter(drafter, str(root / "hidden"), hidden_size=64),
        "layers": _copy_drafter(drafter, str(root / "layers"), dflash_config={"target_layer_ids": [0, 7]}),
        "nomask": _copy_drafter(drafter, str(root / "nomask"), dflash_config={"mask_token_id": None}),
        "trained_for": _copy_drafter(drafter, str(root / "trained_for"), num_target_layers=36),
        "hybrid": _hybrid_target(target, str(root / "hybrid")),
    }


CASES = [
    # (id, target key, speculative config (with {drafter}/{...} placeholders), extra LLM kwargs, error regex)
    ("unknown-key", "target", {"model": "{drafter}", "max_node": 8}, {}, r"Unknown key\(s\) \['max_node'\]"),
    ("zero-budget", "target", {"model": "{drafter}", "max_nodes": 0}, {}, r"max_nodes.*greater than or equal to 1"),
    ("absurd-budget", "target", {"model": "{drafter}", "max_nodes": 10**6}, {}, r"max_nodes.*less than or equal"),
    ("wrong-type", "target", {"model": "{drafter}", "topk": "eight"}, {}, r"topk.*integer"),
    ("no-model", "target", {}, {}, r"needs 'model'"),
    ("spec-tokens", "target", {"model": "{drafter}", "num_speculative_tokens": 4}, {}, r"num_speculative_tokens.*max_nodes"),
    ("missing-drafter", "target", {"model": "/nonexistent/drafter"}, {}, r"does not exist"),
    ("no-config-json", "target", {"model": "{empty}"}, {}, r"no config.json"),
    ("not-dflash", "target", {"model": "{target}"}, {}, r"not a DFlash drafter"),
    ("vocab-mismatch", "target", {"model": "{vocab}"}, {}, r"another target.*vocab_size is 999"),
    ("hidden-mismatch", "target", {"model": "{hidden}"}, {}, r"another target.*hidden size 64"),
    ("layer-ids", "target", {"model": "{layers}"}, {}, r"target_layer_ids \[0, 7\].*outside \[0, 2\]"),
    ("no-mask-token", "target", {"model": "{nomask}"}, {}, r"mask_token_id"),
    ("trained-for-other", "target", {"model": "{trained_for}"}, {}, r"36-layer target"),
    ("hybrid-target", "hybrid", {"model": "{drafter}"}, {}, r"pure-attention target"),
    ("async-scheduling", "target", {"model": "{drafter}"}, {"async_scheduling": True}, r"async scheduling"),
    ("lora", "target", {"model": "{drafter}"}, {"enable_lora": True}, r"LoRA"),
    ("fp8-kv", "target", {"model": "{drafter}"}, {"kv_cache_dtype": "fp8"}, r"quantized KV cache"),
    ("full-cudagraphs", "target", {"model": "{drafter}"},
     {"compilation_config": {"cudagraph_mode": "FULL"}}, r"cudagraph_mode FULL"),
    ("min-over-max", "target", {"model": "{drafter}", "min_nodes": 9, "max_nodes": 4}, {},
     r"min_nodes \(9\) must not exceed max_nodes \(4\)"),
    ("unknown-device", "target", {"model": "{drafter}", "device_profile": "TPU v9"}, {},
     r"device_profile 'TPU v9' is neither a file nor a known device"),
    ("bad-budget", "target", {"model": "{drafter}", "budget": "huge"}, {}, r"budget.*'auto' or 'fixed'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_fails_before_model_load(bad, case):
    from vllm import LLM

    _, target_key, spec, extra, pattern = case
    spec = {"method": "bastion", **{k: (v.format(**bad) if isinstance(v, str) else v) for k, v in spec.items()}}
    with pytest.raises(BastionConfigError, match=pattern):
        LLM(model=bad[target_key], speculative_config=spec, enforce_eager=True, **extra)


def test_config_model_is_pure_and_strict():
    cfg = BastionConfig.from_user_dict({"method": "bastion", "model": "/x", "max-nodes": 20})
    assert cfg.max_nodes == 20 and cfg.topk == 8 and cfg.budget == "auto"
    assert cfg.vllm_passthrough() == {"model": "/x"}
    assert cfg.resolved_depth({"block_size": 16}) == 15
    assert cfg.resolved_depth({}) == 15
    assert BastionConfig(model="/x", max_nodes=4).resolved_depth({"block_size": 16}) == 4
    with pytest.raises(BastionConfigError, match="JSON object"):
        BastionConfig.from_user_dict(["bastion"])
    with pytest.raises(BastionConfigError, match="stats_log_interval_s"):
        BastionConfig.from_user_dict({"model": "/x", "stats_log_interval_s": -1})
