"""vllm_bastion.tools.scale_pair: the widened pair computes exactly what the source pair computes.

A tiny random (Qwen3 target, DFlash drafter) pair with O(1) activations and non-trivial norm
weights is widened to several shapes (residual tiling factors 1, 2, 3, 4; a GQA group size that
grows; dead heads, FFN units and layers; extra drafter layers), and the widened target's fp32
logits (transformers) and the widened drafter's fp32 block logits (tools.training.DFlashDrafter,
the vLLM-mirroring forward) are compared with the source's. Then the cached, atomic
``ensure_scaled_pair`` and the bf16 path (weights copied bit-exactly) are checked. Offline; vLLM
is not started here.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from vllm_bastion.config import check_drafter_matches_target
from vllm_bastion.tools import scale_pair as S

SRC = dict(hidden=64, heads=4, kv_heads=2, head_dim=16, inter=96, layers=4, vocab=256)
DRAFTER_LAYERS, BLOCK, TARGET_LAYER_IDS = 2, 4, [0, 2]


def _make_source(root: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[str, str]:
    """A random pair whose every weight matters: matrices ~ N(0, 1/fan_in), norms ~ 1 + N(0, 0.3^2)."""
    from safetensors.torch import save_file
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from tiny_models import make_drafter

    tdir, ddir = os.path.join(root, "target"), os.path.join(root, "drafter")
    cfg = Qwen3Config(
        vocab_size=SRC["vocab"], hidden_size=SRC["hidden"], intermediate_size=SRC["inter"],
        num_hidden_layers=SRC["layers"], num_attention_heads=SRC["heads"],
        num_key_value_heads=SRC["kv_heads"], head_dim=SRC["head_dim"], max_position_embeddings=512,
        tie_word_embeddings=False, bos_token_id=None, eos_token_id=2, pad_token_id=3, rope_theta=10000.0,
    )
    g = torch.Generator().manual_seed(seed)

    def randomize(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in sd.items():
            if v.dim() == 1:
                out[k] = 1.0 + 0.3 * torch.randn(v.shape, generator=g)
            elif "embed_tokens" in k:
                out[k] = torch.randn(v.shape, generator=g)
            else:
                out[k] = torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5
        return {k: v.to(dtype).contiguous() for k, v in out.items()}

    model = Qwen3ForCausalLM(cfg)
    model.load_state_dict(randomize(model.state_dict()))
    model.to(dtype).save_pretrained(tdir)
    make_drafter(tdir, ddir, layers=DRAFTER_LAYERS, block_size=BLOCK, target_layer_ids=TARGET_LAYER_IDS,
                 dtype=dtype)
    sd = S._load_safetensors(ddir)
    save_file(randomize(sd), os.path.join(ddir, "model.safetensors"), metadata={"format": "pt"})
    return tdir, ddir


@pytest.fixture(scope="module")
def source_pair(tmp_path_factory):
    return _make_source(str(tmp_path_factory.mktemp("scale_src")))


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, SRC["vocab"], (3, 40), generator=g)
    anchors = torch.stack([torch.randperm(30, generator=g)[:4].sort().values + 2 for _ in range(3)])
    return tokens, anchors


# hidden, q heads, kv heads, FFN, target layers, drafter layers: tiling factor 1 (only dead
# heads / units / layers), 2, 3 (not a power of two) and 4 with the GQA group growing 2 -> 4
SHAPES = [
    S.PairShape("t1", 64, 4, 2, 130, 7, 2),
    S.PairShape("t2", 128, 8, 4, 200, 9, 3),
    S.PairShape("t3", 192, 12, 6, 96, 5, 2),
    S.PairShape("t4", 256, 16, 4, 384, 11, 5),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])
def test_widened_pair_computes_the_source_pair(source_pair, tmp_path, shape):
    st, sd = source_pair
    wt, wd = S.build_scaled_pair(shape, str(tmp_path / "wide"), src_target=st, src_drafter=sd,
                                 dtype=torch.float32, log=lambda _m: None)
    tcfg, dcfg = json.load(open(os.path.join(wt, "config.json"))), json.load(open(os.path.join(wd, "config.json")))
    assert (tcfg["hidden_size"], tcfg["num_attention_heads"], tcfg["num_key_value_heads"],
            tcfg["intermediate_size"], tcfg["num_hidden_layers"]) == (
        shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads,
        shape.intermediate_size, shape.num_hidden_layers)
    assert dcfg["num_hidden_layers"] == shape.drafter_layers and dcfg["hidden_size"] == shape.hidden_size
    assert dcfg["architectures"] == ["DFlashDraftModel"] and dcfg["block_size"] == BLOCK
    check_drafter_matches_target(dcfg, tcfg)          # what BASTION checks at start-up
    plan = S.plan_widening(json.load(open(os.path.join(st, "config.json"))),
                           json.load(open(os.path.join(sd, "config.json"))), shape)
    assert dcfg["dflash_config"]["target_layer_ids"] == [plan.layer_pos[i] for i in TARGET_LAYER_IDS]
    n = sum(v.numel() for v in S._load_safetensors(wt).values())
    assert n == S.count_params(tcfg)

    tokens, anchors = _inputs()
    t = S.compare_targets(st, wt, tokens)
    assert t["max_abs_logit"] > 3.0                   # the source's logits are not trivially small
    assert t["max_abs_diff"] < 1e-4 * t["max_abs_logit"], t
    assert t["top1_agree"] == 1.0
    d = S.compare_drafters(st, sd, wt, wd, tokens, anchors)
    assert d["max_abs_logit"] > 3.0
    assert d["max_abs_diff"] < 1e-4 * d["max_abs_logit"], d
    assert d["top1_agree"] == 1.0


def test_plan_places_each_q_head_in_its_own_kv_group():
    tcfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 96, "num_hidden_layers": 4, "vocab_size": 256}
    dcfg = dict(tcfg, num_hidden_layers=2, dflash_config={"target_layer_ids": [0, 2]})
    p = S.plan_widening(tcfg, dcfg, SHAPES[3])          # 4q/2kv -> 16q/4kv: group size 2 -> 4
    assert p.tiles == 4 and p.kv_pos == (0, 3)
    assert [q // (16 // 4) for q in p.q_pos] == [p.kv_pos[i // 2] for i in range(4)]
    assert p.layer_pos[0] == 0 and p.layer_pos[-1] == 10 and list(p.layer_pos) == sorted(set(p.layer_pos))
    with pytest.raises(ValueError, match="group size"):
        S.plan_widening(tcfg, dcfg, S.PairShape("bad", 128, 8, 8, 96, 4, 2))   # group 2 -> 1
    with pytest.raises(ValueError, match="multiple"):
        S.plan_widening(tcfg, dcfg, S.PairShape("bad", 96, 6, 2, 96, 4, 2))    # 96 / 64


def test_bf16_weights_are_copied_exactly(tmp_path):
    """From a bf16 source the widened bf16 weights hold the source values bit for bit (no rescaled
    norm weights or eps), so fp32 compute on both gives the same logits up to summation order."""
    st, sd = _make_source(str(tmp_path / "src"), dtype=torch.bfloat16, seed=1)
    wt, wd = S.build_scaled_pair(SHAPES[2], str(tmp_path / "wide"), src_target=st, src_drafter=sd,
                                 dtype=torch.bfloat16, log=lambda _m: None)
    src, wide = S._load_safetensors(st), S._load_safetensors(wt)
    assert all(v.dtype == torch.bfloat16 for v in wide.values())
    assert torch.equal(wide["model.norm.weight"], src["model.norm.weight"].repeat(3))
    tokens, anchors = _inputs(1)
    t = S.compare_targets(st, wt, tokens)
    assert t["max_abs_diff"] < 1e-4 * t["max_abs_logit"] and t["top1_agree"] == 1.0, t
    d = S.compare_drafters(st, sd, wt, wd, tokens, anchors)
    assert d["max_abs_diff"] < 1e-4 * d["max_abs_logit"] and d["top1_agree"] == 1.0, d


def test_ensure_scaled_pair_builds_once_and_rebuilds_when_the_source_changes(source_pair, tmp_path):
    from safetensors.torch import save_file

    st, sd = source_pair
    src_t, src_d = str(tmp_path / "src_t"), str(tmp_path / "src_d")
    import shutil
    shutil.copytree(st, src_t)
    shutil.copytree(sd, src_d)
    logs: list[str] = []
    kw = dict(root=str(tmp_path / "cache"), src_target=src_t, src_drafter=src_d, dtype=torch.float32,
              log=logs.append, progress=False)
    wt, wd = S.ensure_scaled_pair(SHAPES[1], **kw)
    assert wt == os.path.join(str(tmp_path / "cache"), "scaled-t2", "target") and os.path.isdir(wd)
    meta = json.load(open(os.path.join(wt, S.SCALED_META_FILE)))
    assert meta["shape"]["hidden_size"] == 128 and meta["format_version"] == S.FORMAT_VERSION
    assert os.path.isfile(os.path.join(wt, "config.json")) and os.path.isfile(os.path.join(wd, "model.safetensors"))
    assert sorted(os.listdir(tmp_path / "cache")) == ["scaled-t2"]      # no temp folder left
    n_builds = sum("building" in m for m in logs)
    assert n_builds == 1
    assert S.ensure_scaled_pair(SHAPES[1], **kw) == (wt, wd)
    assert sum("building" in m for m in logs) == 1                     # cached: not rebuilt

    w = S._load_safetensors(src_t)                                      # retrain the source ...
    w["lm_head.weight"] = w["lm_head.weight"] * 2
    save_file(w, os.path.join(src_t, "model.safetensors"), metadata={"format": "pt"})
    assert S.ensure_scaled_pair(SHAPES[1], **kw) == (wt, wd)
    assert sum("building" in m for m in logs) == 2                     # ... and the cache follows
    assert sorted(os.listdir(tmp_path / "cache")) == ["scaled-t2"]
    assert S.compare_targets(src_t, wt, _inputs()[0])["max_abs_diff"] < 1e-3
