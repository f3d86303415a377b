"""Tiny Qwen3 target + DFlash drafter, built locally (no model hub).

Random weights: enough to prove correctness (greedy equality, losslessness),
not speed. `successor_target` builds a target whose next token is a fixed
function of the current one, so a drafter can be made to agree with it.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import torch


def make_tokenizer(out_dir: str, vocab_size: int = 512) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:120]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train(
        files,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            show_progress=False,
            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
        bos_token=None, unk_token=None,
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"], model_max_length=4096,
    )
    fast.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
        "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    fast.save_pretrained(out_dir)
    return len(fast)


def make_target(out_dir: str, *, layers: int = 4, hidden: int = 128, heads: int = 4,
                kv_heads: int = 2, head_dim: int = 32, vocab: int = 512,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    n_vocab = make_tokenizer(out_dir, vocab)
    cfg = Qwen3Config(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=3 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=2, pad_token_id=3, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # larger logits: fewer near-ties under different kernels
        model.lm_head.weight.mul_(8.0)
    model.to(dtype).save_pretrained(out_dir)
    return out_dir


def make_drafter(target_dir: str, out_dir: str, *, layers: int = 1, block_size: int = 8,
                 target_layer_ids: list[int] | None = None, seed: int = 1,
                 dtype: torch.dtype = torch.float32, scale: float = 0.02) -> str:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    t = json.load(open(os.path.join(target_dir, "config.json")))
    H, nh, nkv, hd, inter, T = (
        t[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads",
                       "head_dim", "intermediate_size", "num_hidden_layers")
    )
    ids = target_layer_ids if target_layer_ids is not None else [0, T - 2]
    cfg = dict(
        t, architectures=["DFlashDraftModel"], model_type="qwen3", num_hidden_layers=layers,
        num_target_layers=T, block_size=block_size, layer_types=["full_attention"] * layers,
        max_window_layers=layers,
        dflash_config={"mask_token_id": t["pad_token_id"], "target_layer_ids": ids},
    )
    cfg["dtype"] = str(dtype).replace("torch.", "")
    cfg.pop("torch_dtype", None)
    json.dump(cfg, open(os.path.join(out_dir, "config.json"), "w"), indent=2)
    g = torch.Generator().manual_seed(seed)

    def r(*s):
        return (torch.randn(*s, generator=g) * scale).to(dtype)

    def o(n):
        return torch.ones(n, dtype=dtype)

    sd = {"norm.weight": o(H), "hidden_norm.weight": o(H), "fc.weight": r(H, H * len(ids))}
    for i in range(layers):
        p = f"layers.{i}."
        sd |= {
            p + "self_attn.q_proj.weight": r(nh * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
            p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nh * hd),
            p + "self_attn.q_norm.weight": o(hd), p + "self_attn.k_norm.weight": o(hd),
            p + "mlp.gate_proj.weight": r(inter, H), p + "mlp.up_proj.weight": r(inter, H),
            p + "mlp.down_proj.weight": r(H, inter),
            p + "input_layernorm.weight": o(H), p + "post_attention_layernorm.weight": o(H),
        }
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    return out_dir
