"""Tests of vllm_bastion.tools.training: DFlash masks/blocks/loss, checkpoint format, the drafter
forward against an independent per-block reference written like vLLM's qwen3_dflash.py, and
(one ~2 min test) the real test pair end to end (offline; vLLM is not started here)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_bastion.tools import training as T


# ---------------------------------------------------------------- loss weights / anchors

def test_loss_weights_decay():
    w = T.dflash_loss_weights(16)
    assert w.shape == (16,)
    assert w[0] == 0 and w[1] == pytest.approx(1.0)
    for k in range(1, 16):
        assert w[k] == pytest.approx(math.exp(-(k - 1) / 7.0), rel=1e-6)
    assert torch.all(w[2:] < w[1:-1])
    assert T.default_gamma(16) == 7.0 and T.default_gamma(8) == 4.0
    w8 = T.dflash_loss_weights(8, gamma=2.0)
    assert w8[3] == pytest.approx(math.exp(-1.0))


def test_sample_anchors_distinct_sorted_in_range_and_seeded():
    lo, hi = torch.tensor([5, 10, 3]), torch.tensor([40, 12, 2])
    a = T.sample_anchors(lo, hi, 6, torch.Generator().manual_seed(0))
    b = T.sample_anchors(lo, hi, 6, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    r0 = a[0].tolist()
    assert r0 == sorted(r0) and len(set(r0)) == 6 and all(5 <= x <= 40 for x in r0)
    assert a[1].tolist()[:3] == [10, 11, 12] and a[1].tolist()[3:] == [-1] * 3  # only 3 candidates
    assert a[2].tolist() == [-1] * 6                                            # empty range


def test_default_target_layer_ids_within_vllm_capture_range():
    assert T.default_target_layer_ids(6, 3) == [1, 2, 4]
    assert T.default_target_layer_ids(4, 2) == [1, 2]
    for L in range(3, 40):
        for n in range(1, 6):
            ids = T.default_target_layer_ids(L, n)
            assert ids == sorted(set(ids)) and all(0 <= i <= L - 2 for i in ids)


# ---------------------------------------------------------------- blocks and mask

def test_build_blocks_inputs_positions_labels():
    S, B, MASK = 20, 4, 99
    tokens = torch.arange(100, 100 + S)[None]
    anchors = torch.tensor([[3, 17, -1]])
    ids, pos, labels, depth = T.build_blocks(tokens, anchors, B, MASK)
    assert ids.shape == pos.shape == labels.shape == depth.shape == (1, 3 * B)
    assert ids[0, :4].tolist() == [103, MASK, MASK, MASK]      # [anchor token, MASK x (B-1)]
    assert pos[0, :4].tolist() == [3, 4, 5, 6]                  # absolute positions anchor..anchor+B-1
    assert labels[0, :4].tolist() == [-100, 104, 105, 106]      # position k predicts token anchor+k
    assert ids[0, 4:8].tolist() == [117, MASK, MASK, MASK]
    assert labels[0, 4:8].tolist() == [-100, 118, 119, -100]    # beyond the sequence: ignored
    assert labels[0, 8:].tolist() == [-100] * 4                 # unused anchor slot
    assert depth[0].tolist() == [0, 1, 2, 3] * 3


def test_attention_mask_context_before_anchor_block_bidirectional():
    B, S = 4, 10
    anchors = torch.tensor([[3, 7], [0, 9]])
    m = T.dflash_attention_mask(anchors, S, B)
    assert m.shape == (2, 8, S + 8) and m.dtype == torch.bool
    for bi in range(2):
        for n in range(2):
            a = anchors[bi, n].item()
            for k in range(B):
                q = n * B + k
                ctx = m[bi, q, :S].tolist()
                assert ctx == [j < a for j in range(S)]           # strictly before the anchor
                blk = m[bi, q, S:].view(2, B)
                assert blk[n].all()                               # own block, both directions
                assert not blk[1 - n].any()                       # never another block


# ---------------------------------------------------------------- checkpoint format

def _tiny_target_cfg(L=4, H=64, nh=4, nkv=2, hd=16, inter=128, vocab=300):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, hidden_size=H, intermediate_size=inter, num_hidden_layers=L,
                       num_attention_heads=nh, num_key_value_heads=nkv, head_dim=hd,
                       tie_word_embeddings=False, eos_token_id=2, pad_token_id=3,
                       rope_theta=10000.0).to_dict()


def _expected_keys(n_layers):
    keys = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    for i in range(n_layers):
        p = f"layers.{i}."
        keys |= {p + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        keys |= {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        keys |= {p + f"mlp.{x}_proj.weight" for x in ("gate", "up", "down")}
        keys |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
    return keys


def test_drafter_checkpoint_roundtrip_keys_shapes_config(tmp_path):
    from safetensors.torch import load_file

    tcfg = _tiny_target_cfg()
    ids = [0, 2]
    cfg = T.drafter_config(tcfg, num_layers=2, block_size=8, target_layer_ids=ids, mask_token_id=4,
                           dtype="bfloat16")
    m = T._drafter_from_config(cfg)
    m.init_weights(generator=torch.Generator().manual_seed(0))
    T.save_drafter(m, cfg, str(tmp_path), torch.bfloat16)

    sd = load_file(str(tmp_path / "model.safetensors"))
    assert set(sd) == _expected_keys(2)   # no "model." prefix, no embed_tokens / lm_head
    H, hd = tcfg["hidden_size"], tcfg["head_dim"]
    assert sd["fc.weight"].shape == (H, H * len(ids))
    assert sd["layers.0.self_attn.q_proj.weight"].shape == (4 * hd, H)
    assert sd["layers.0.self_attn.k_proj.weight"].shape == (2 * hd, H)
    assert sd["layers.1.self_attn.k_norm.weight"].shape == (hd,)
    assert sd["layers.1.mlp.down_proj.weight"].shape == (H, tcfg["intermediate_size"])
    assert all(v.dtype == torch.bfloat16 for v in sd.values())

    c = json.loads((tmp_path / "config.json").read_text())
    assert c["architectures"] == ["DFlashDraftModel"] and c["model_type"] == "qwen3"
    assert c["num_hidden_layers"] == 2 and c["num_target_layers"] == 4 and c["block_size"] == 8
    assert c["layer_types"] == ["full_attention"] * 2
    assert c["dflash_config"] == {"mask_token_id": 4, "target_layer_ids": [0, 2]}
    assert c["vocab_size"] == tcfg["vocab_size"] and c["hidden_size"] == H
    assert c["rope_parameters"]["rope_theta"] == 10000.0

    m2, c2 = T.load_drafter(str(tmp_path), torch.float32)
    for k, v in m.state_dict().items():
        assert torch.equal(m2.state_dict()[k], v.to(torch.bfloat16).float())

    # the repo's start-up checks accept it against its target
    from vllm_bastion.config import check_drafter_matches_target

    check_drafter_matches_target(c, tcfg)


# ---------------------------------------------------------------- forward == vLLM-style reference

def _rms(x, w, eps=1e-6):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def _rope_neox(x, pos, theta):
    # x [L, heads, hd]; rotate pairs (i, i + hd/2) by pos * theta^(-2i/hd), via complex numbers
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos.double()[:, None] * freqs[None]
    z = torch.complex(x[..., : hd // 2].double(), x[..., hd // 2:].double()) * torch.polar(
        torch.ones_like(ang), ang)[:, None, :]
    return torch.cat([z.real, z.imag], -1).to(x.dtype)


def _reference_block(m: T.DFlashDrafter, aux, embeds_block, anchor):
    """One block the way vLLM computes it: combine_hidden_states (fc) -> precompute context K/V
    (hidden_norm, per-layer k/v proj without input_layernorm, k_norm, RoPE at 0..anchor-1) into
    the cache; then the 1+K query tokens at anchor.. run through the layers attending to
    [cache ; themselves] without a causal mask; final norm."""
    nh, nkv, hd, th = m.num_heads, m.num_kv_heads, m.head_dim, m.rope_theta
    B = embeds_block.shape[0]
    ctx = aux[:anchor] @ m.fc.weight.T                      # combine_hidden_states
    ctx = _rms(ctx, m.hidden_norm.weight)                   # _project_context_kv: rms_norm(hidden_norm)
    cpos, qpos = torch.arange(anchor), torch.arange(anchor, anchor + B)
    h = embeds_block
    for layer in m.layers:
        a = layer.self_attn
        kc = _rope_neox(_rms((ctx @ a.k_proj.weight.T).view(anchor, nkv, hd), a.k_norm.weight), cpos, th)
        vc = (ctx @ a.v_proj.weight.T).view(anchor, nkv, hd)
        x = _rms(h, layer.input_layernorm.weight)
        q = _rope_neox(_rms((x @ a.q_proj.weight.T).view(B, nh, hd), a.q_norm.weight), qpos, th)
        k = _rope_neox(_rms((x @ a.k_proj.weight.T).view(B, nkv, hd), a.k_norm.weight), qpos, th)
        v = (x @ a.v_proj.weight.T).view(B, nkv, hd)
        K, V = torch.cat([kc, k]), torch.cat([vc, v])
        outs = []
        for head in range(nh):
            kv = head // (nh // nkv)
            att = torch.softmax(q[:, head] @ K[:, kv].T / math.sqrt(hd), -1)
            outs.append(att @ V[:, kv])
        h = h + torch.cat(outs, -1) @ a.o_proj.weight.T
        y = _rms(h, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        h = h + (torch.nn.functional.silu(y @ mlp.gate_proj.weight.T) * (y @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
    return _rms(h, m.norm.weight)


def test_drafter_forward_matches_per_block_vllm_style_reference():
    torch.manual_seed(0)
    H, B, S, nf = 64, 8, 40, 2
    m = T.DFlashDrafter(hidden_size=H, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        intermediate_size=96, num_features=nf, rope_theta=10000.0).double()
    m.init_weights(std=0.1, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.add_(0.2 * torch.randn_like(p))
    embed = torch.nn.Embedding(50, H).double()
    MASK = 7
    tokens = torch.randint(10, 50, (2, S))
    aux = torch.randn(2, S, H * nf, dtype=torch.float64)
    anchors = torch.tensor([[1, 9, 30], [5, 6, 32]])
    ids, pos, labels, _ = T.build_blocks(tokens, anchors, B, MASK)
    with torch.no_grad():
        out = m(embed(ids), pos, m.fuse(aux), torch.arange(S).expand(2, S),
                T.dflash_attention_mask(anchors, S, B))
        for bi in range(2):
            for n in range(3):
                a = anchors[bi, n].item()
                blk = torch.cat([tokens[bi, a:a + 1], torch.full((B - 1,), MASK)])
                ref = _reference_block(m, aux[bi], embed(blk), a)
                torch.testing.assert_close(out[bi, n * B:(n + 1) * B], ref, rtol=1e-5, atol=1e-5)


def test_drafter_block_ignores_future_context_and_other_blocks():
    torch.manual_seed(0)
    H, B, S = 32, 4, 24
    m = T.DFlashDrafter(hidden_size=H, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                        intermediate_size=64, num_features=1)
    m.init_weights(std=0.2)
    emb = torch.randn(1, 2 * B, H)
    ctx = torch.randn(1, S, H)
    anchors = torch.tensor([[6, 15]])
    pos = (anchors[:, :, None] + torch.arange(B)).view(1, -1)
    mask = T.dflash_attention_mask(anchors, S, B)
    cpos = torch.arange(S)[None]
    with torch.no_grad():
        base = m(emb, pos, ctx, cpos, mask)
        ctx2 = ctx.clone()
        ctx2[:, 6:] += 5.0                      # context at/after the first anchor
        emb2 = emb.clone()
        emb2[:, B:] += 5.0                      # the second block's inputs
        out = m(emb2, pos, ctx2, cpos, mask)
    torch.testing.assert_close(out[:, :B], base[:, :B])   # block 0 unaffected
    assert not torch.allclose(out[:, B:], base[:, B:])    # block 1 did change


# ---------------------------------------------------------------- corpus / tokenizer

def test_heldout_split_deterministic_disjoint():
    files = T.stdlib_files()
    assert len(files) > 200
    tr, he = T.split_files(files)
    assert set(tr).isdisjoint(he) and len(tr) + len(he) == len(files)
    assert 0.02 < len(he) / len(files) < 0.09
    assert T.split_files(files) == (tr, he)


def test_tokenizer_specials_and_chat_template(tmp_path):
    tok = T.train_tokenizer(str(tmp_path), vocab_size=400, max_chars=300_000)
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(t) == 400
    assert [t.convert_tokens_to_ids(x) for x in T.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert t.eos_token == "<|im_end|>" and t.pad_token == "<|pad|>"
    assert t.encode("a <|mask|> b", add_special_tokens=False).count(4) == 1
    s = t.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert s == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = t.encode("def f(x):\n    return x\n", add_special_tokens=False)
    assert t.decode(ids) == "def f(x):\n    return x\n"
    assert tok is not None


# ---------------------------------------------------------------- the real test pair (~1.5 min)

@pytest.fixture(scope="module")
def test_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained_test_pair")
    return T.build_test_pair(str(out), seed=0, log=lambda s: None)


def test_test_pair_files_and_acceptance(test_pair):
    from safetensors.torch import load_file

    tdir, ddir = test_pair["target_dir"], test_pair["drafter_dir"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              T.PROMPTS_FILE, T.META_FILE):
        assert os.path.exists(os.path.join(tdir, f)), f
    tcfg = json.load(open(os.path.join(tdir, "config.json")))
    dcfg = json.load(open(os.path.join(ddir, "config.json")))
    assert tcfg["architectures"] == ["Qwen3ForCausalLM"] and tcfg["tie_word_embeddings"] is False
    assert tcfg["head_dim"] == 32 and tcfg["vocab_size"] == 512
    sd = load_file(os.path.join(ddir, "model.safetensors"))
    assert set(sd) == _expected_keys(dcfg["num_hidden_layers"])
    assert all(v.dtype == torch.float32 for v in sd.values())
    ids = dcfg["dflash_config"]["target_layer_ids"]
    assert all(0 <= i <= tcfg["num_hidden_layers"] - 2 for i in ids)
    assert dcfg["dflash_config"]["mask_token_id"] == 4

    tm, dm = test_pair["target"], test_pair["drafter"]
    assert tm["eval_loss"] < 4.5
    assert tm["loss_ctx_65plus"] < tm["loss_ctx_1"] - 0.3           # the target uses its context
    assert dm["chain_accepted_mean"] >= 1.5                          # greedy chain acceptance
    assert dm["top1_by_depth"][0] > 0.5
    # room for trees: the target's token is often in the drafter's top-8 where its top-1 is
    # wrong (float32 training on AVX2: 0.12-0.16 per depth)
    assert min(dm["top1_wrong_in_top8_by_depth"]) > 0.08
    # benchmark prompts from held-out files, saved beside the target
    prompts = json.load(open(os.path.join(tdir, T.PROMPTS_FILE)))
    assert len(prompts) >= 32 and all(len(p["token_ids"]) == 64 for p in prompts)
