"""Offline, seeded training of a small Qwen3 target and a DFlash drafter for it.

Everything here runs on CPU with torch + transformers + tokenizers + safetensors
and never touches the network or vLLM (nothing from vllm is imported). It
produces a (target, drafter) pair that vLLM 0.32 loads as-is:

* ``train_tokenizer``: byte-level BPE trained on Python's standard library,
  saved as a HF fast tokenizer (eos ``<|im_end|>``, pad ``<|pad|>``, a
  dedicated never-seen ``<|mask|>`` token used as the DFlash mask token, and a
  ChatML chat template).
* ``train_target``: a small ``Qwen3ForCausalLM`` trained from scratch as a
  causal LM on the stdlib sources. A deterministic ~5% of the files (chosen by
  the md5 of their path relative to the stdlib root) is held out for
  evaluation and benchmark prompts.
* ``train_drafter``: a DFlash block-diffusion drafter in z-lab's checkpoint
  format, trained on the target's own greedy continuations with the DFlash
  recipe. The forward pass (:class:`DFlashDrafter`) mirrors vLLM's
  ``qwen3_dflash.py`` exactly: context features = fc(concat(target layer
  outputs)) -> hidden_norm -> per-layer k_proj/v_proj (no input_layernorm),
  k_norm, RoPE at the context positions; block = [anchor token, MASK x (B-1)]
  embedded with the *target's* embed_tokens, at absolute positions
  anchor..anchor+B-1, non-causal within the block, seeing only context before
  the anchor; final norm -> the *target's* lm_head.
* ``build_default_pair`` / ``build_test_pair``: the shipped demo/benchmark
  pair (``vllm_bastion/assets/pair``) and a much smaller float32 pair for tests.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import platform
import sysconfig
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "SPECIAL_TOKENS", "DOC_SEP_TOKEN", "MASK_TOKEN", "CHAT_TEMPLATE",
    "stdlib_files", "is_heldout", "split_files", "train_tokenizer",
    "TargetSpec", "DrafterSpec", "train_target", "train_drafter",
    "DFlashDrafter", "dflash_attention_mask", "build_blocks", "dflash_loss_weights",
    "sample_anchors", "default_target_layer_ids", "default_gamma",
    "load_drafter", "save_drafter", "heldout_prompts",
    "build_default_pair", "build_test_pair", "default_pair_dir", "default_pair_paths",
    "DEFAULT_TARGET", "DEFAULT_DRAFTER", "TEST_TARGET", "TEST_DRAFTER",
]

# id order matters: <|endoftext|>=0, <|im_start|>=1, <|im_end|>=2 (eos), <|pad|>=3, <|mask|>=4
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|mask|>"]
DOC_SEP_TOKEN = "<|endoftext|>"   # separates files in the training stream (not eos)
MASK_TOKEN = "<|mask|>"           # DFlash mask token: never appears in training text
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
META_FILE = "bastion_training.json"
PROMPTS_FILE = "heldout_prompts.json"

Log = Callable[[str], None]


def _print(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------
# Corpus: Python's standard library
# --------------------------------------------------------------------------------------

def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files(root: str | None = None, max_bytes: int = 1_000_000) -> list[str]:
    """Sorted ``*.py`` paths (relative to the stdlib root), site-packages excluded."""
    root = root or stdlib_root()
    out = []
    for p in glob.glob(os.path.join(root, "**", "*.py"), recursive=True):
        rel = os.path.relpath(p, root)
        parts = rel.split(os.sep)
        if "site-packages" in parts or "dist-packages" in parts or "__pycache__" in parts:
            continue
        try:
            if os.path.getsize(p) > max_bytes or os.path.getsize(p) == 0:
                continue
        except OSError:
            continue
        out.append(rel)
    return sorted(out)


def _h(s: str) -> int:
    return int(hashlib.md5(s.encode("utf-8")).hexdigest()[:8], 16)


def is_heldout(relpath: str, frac: float = 0.05) -> bool:
    """Deterministic held-out rule: md5(relative path) bucket < frac."""
    return (_h(relpath.replace(os.sep, "/")) % 10_000) < int(round(frac * 10_000))


def split_files(files: list[str], heldout_frac: float = 0.05) -> tuple[list[str], list[str]]:
    train = [f for f in files if not is_heldout(f, heldout_frac)]
    held = [f for f in files if is_heldout(f, heldout_frac)]
    return train, held


def _read(root: str, rel: str) -> str | None:
    try:
        with open(os.path.join(root, rel), encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


def _ordered_texts(root: str, rels: list[str], max_chars: int | None, seed: int) -> list[tuple[str, str]]:
    """Files in a seed-dependent but deterministic order, truncated at max_chars total."""
    order = sorted(rels, key=lambda r: _h(f"{seed}:{r}"))
    out, total = [], 0
    for r in order:
        t = _read(root, r)
        if not t:
            continue
        out.append((r, t))
        total += len(t)
        if max_chars is not None and total >= max_chars:
            break
    return out


def _encode_stream(tok, texts: list[str]) -> torch.Tensor:
    """Token stream: file tokens joined by <|endoftext|>."""
    sep = tok.convert_tokens_to_ids(DOC_SEP_TOKEN)
    encs = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ids: list[int] = []
    for e in encs:
        ids.extend(e.ids)
        ids.append(sep)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

def train_tokenizer(out_dir: str, vocab_size: int = 4096, *, max_chars: int | None = 8_000_000,
                    heldout_frac: float = 0.05, seed: int = 0, root: str | None = None):
    """Byte-level BPE on the stdlib training files; saved as a HF fast tokenizer.

    Returns the ``PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    root = root or stdlib_root()
    train_rels, _ = split_files(stdlib_files(root), heldout_frac)
    texts = [t for _, t in _ordered_texts(root, train_rels, max_chars, seed)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=SPECIAL_TOKENS,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
        length=len(texts),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>", bos_token=None,
        unk_token=None, additional_special_tokens=["<|endoftext|>", "<|im_start|>", MASK_TOKEN],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def _load_tokenizer(d: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(d)


# --------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------

@dataclass
class TargetSpec:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    intermediate_size: int = 768
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    seq_len: int = 512
    batch_size: int = 8
    steps: int = 1200
    lr: float = 2e-3
    min_lr_frac: float = 0.1
    warmup: int = 60
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    autocast: bool = True          # bf16 autocast for the matmuls (fp32 master weights)
    save_dtype: str = "bfloat16"
    max_train_chars: int | None = None   # cap on training text (None: all training files)
    tokenizer_max_chars: int | None = 8_000_000
    heldout_frac: float = 0.05
    eval_windows: int = 48
    log_every: int = 50


@dataclass
class DrafterSpec:
    num_layers: int = 2
    block_size: int = 16
    target_layer_ids: list[int] | None = None   # None: default_target_layer_ids(L, num_features)
    num_features: int = 3
    gamma: float | None = None                  # None: default_gamma(block_size)
    data: str = "target"                        # "target" (greedy continuations) or "corpus"
    num_sequences: int = 1536
    seq_len: int = 320
    prompt_lens: tuple[int, ...] = (32, 64, 128)
    sample_frac: float = 0.0                    # fraction of sequences sampled (T below) not greedy
    sample_temperature: float = 0.8
    gen_batch: int = 128
    num_anchors: int = 16
    batch_size: int = 8
    epochs: int = 12
    lr: float = 2e-3
    min_lr_frac: float = 0.05
    warmup: int = 40
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    autocast: bool = True
    init_from_target: bool = False  # copy the target's last layers as initial drafter layers (worse here)
    save_dtype: str | None = None   # None: the target's dtype
    eval_sequences: int = 48
    eval_prompt_len: int = 64
    log_every: int = 100


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled)


def _lr_at(step: int, total: int, base: float, warmup: int, min_frac: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _param_groups(model: nn.Module, wd: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim == 2 and "embed_tokens" not in n else no_decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _dtype(name: str) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


@torch.no_grad()
def _eval_target(model, stream: torch.Tensor, seq_len: int, n_windows: int, autocast: bool,
                 batch: int = 8) -> dict[str, Any]:
    """Mean held-out loss, plus loss by context length (shows the model uses attention)."""
    model.eval()
    n = min(n_windows, (len(stream) - 1) // seq_len)
    wins = stream[: n * seq_len].view(n, seq_len)
    tot = torch.zeros(seq_len - 1, dtype=torch.float64)
    for i in range(0, n, batch):
        x = wins[i: i + batch]
        with _autocast(autocast):
            logits = model(input_ids=x).logits.float()
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                             reduction="none").view(x.shape[0], -1)
        tot += ce.sum(0).double()
    per_pos = tot / n
    loss = float(per_pos.mean())

    def band(a, b):
        return float(per_pos[a:b].mean())

    model.train()
    return {
        "eval_loss": loss, "eval_ppl": math.exp(loss), "eval_tokens": int(n * (seq_len - 1)),
        # loss of the token at position p+1 given p+1 tokens of context
        "loss_ctx_1": band(0, 1), "loss_ctx_2_8": band(1, 8), "loss_ctx_9_64": band(8, 64),
        "loss_ctx_65plus": band(64, seq_len - 1),
    }


def train_target(out_dir: str, spec: TargetSpec | None = None, *, seed: int = 0,
                 tokenizer_dir: str | None = None, root: str | None = None,
                 log: Log = _print) -> dict[str, Any]:
    """Train a Qwen3ForCausalLM from scratch on the stdlib; save it (+ tokenizer) to out_dir.

    If ``tokenizer_dir`` is None a tokenizer is trained into ``out_dir`` first.
    Returns a dict of metrics (also written to ``out_dir/bastion_training.json``).
    """
    from transformers import Qwen3Config, Qwen3ForCausalLM

    spec = spec or TargetSpec()
    t0 = time.time()
    root = root or stdlib_root()
    os.makedirs(out_dir, exist_ok=True)
    if tokenizer_dir is None:
        tok = train_tokenizer(out_dir, spec.vocab_size, max_chars=spec.tokenizer_max_chars,
                              heldout_frac=spec.heldout_frac, seed=seed, root=root)
        log(f"[target] tokenizer: vocab {len(tok)} trained in {time.time() - t0:.1f}s")
    else:
        tok = _load_tokenizer(tokenizer_dir)
        if os.path.abspath(tokenizer_dir) != os.path.abspath(out_dir):
            tok.save_pretrained(out_dir)
    t_tok = time.time()
    train_rels, held_rels = split_files(stdlib_files(root), spec.heldout_frac)
    train_stream = _encode_stream(tok, [t for _, t in _ordered_texts(root, train_rels, spec.max_train_chars, seed)])
    held_stream = _encode_stream(tok, [t for _, t in _ordered_texts(root, held_rels, None, 0)])
    log(f"[target] corpus: {len(train_rels)} train files -> {len(train_stream):,} tokens; "
        f"{len(held_rels)} held-out files -> {len(held_stream):,} tokens ({time.time() - t_tok:.1f}s)")

    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        rope_theta=spec.rope_theta, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[target] Qwen3 {spec.num_layers}L h{spec.hidden_size} {spec.num_heads}x{spec.head_dim} "
        f"kv{spec.num_kv_heads} ffn{spec.intermediate_size} vocab{len(tok)}: {n_params / 1e6:.2f}M params")
    opt = torch.optim.AdamW(_param_groups(model, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(seed + 1)
    S, B = spec.seq_len, spec.batch_size
    t_train = time.time()
    ema = None
    for step in range(spec.steps):
        lr = _lr_at(step, spec.steps, spec.lr, spec.warmup, spec.min_lr_frac)
        for grp in opt.param_groups:
            grp["lr"] = lr
        starts = torch.randint(0, len(train_stream) - S, (B,), generator=g)
        x = torch.stack([train_stream[s: s + S] for s in starts.tolist()])
        with _autocast(spec.autocast):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lv = loss.item()
        ema = lv if ema is None else 0.95 * ema + 0.05 * lv
        if (step + 1) % spec.log_every == 0 or step == spec.steps - 1:
            el = time.time() - t_train
            log(f"[target] step {step + 1}/{spec.steps} loss {ema:.3f} lr {lr:.2e} "
                f"{(step + 1) * B * S / el:.0f} tok/s {el:.0f}s")
    train_s = time.time() - t_train
    metrics = _eval_target(model, held_stream, S, spec.eval_windows, spec.autocast)
    log(f"[target] held-out loss {metrics['eval_loss']:.3f} ppl {metrics['eval_ppl']:.2f} | loss by context: "
        f"1 tok {metrics['loss_ctx_1']:.2f}, 2-8 {metrics['loss_ctx_2_8']:.2f}, "
        f"9-64 {metrics['loss_ctx_9_64']:.2f}, 65+ {metrics['loss_ctx_65plus']:.2f}")
    model.to(_dtype(spec.save_dtype)).save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    prompts = heldout_prompts(tok, n=64, prompt_tokens=64, seed=0, root=root, heldout_frac=spec.heldout_frac)
    with open(os.path.join(out_dir, PROMPTS_FILE), "w", encoding="utf-8") as f:
        json.dump(prompts, f, indent=0)
    metrics.update({
        "params": n_params, "train_tokens": spec.steps * B * S, "train_seconds": round(train_s, 1),
        "wall_seconds": round(time.time() - t0, 1), "train_stream_tokens": len(train_stream),
        "heldout_files": len(held_rels), "train_files": len(train_rels),
    })
    meta = {
        "kind": "target", "seed": seed, "spec": asdict(spec), "metrics": metrics,
        "corpus": {"root": root, "python": platform.python_version(),
                   "heldout_rule": f"md5(relpath)[:8] % 10000 < {int(round(spec.heldout_frac * 10000))}",
                   "heldout_files": [r.replace(os.sep, "/") for r in held_rels]},
        "env": _env(),
    }
    with open(os.path.join(out_dir, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return metrics


def _env() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "machine": platform.machine(),
            "cpu_count": str(os.cpu_count())}


def heldout_prompts(tok, n: int = 64, prompt_tokens: int = 64, seed: int = 0, root: str | None = None,
                    heldout_frac: float = 0.05) -> list[dict[str, Any]]:
    """Deterministic prompts from held-out stdlib files: ``prompt_tokens`` tokens starting at a
    line boundary. Each item: {"file", "text", "token_ids"}. ``text`` re-encodes to
    ``token_ids`` (checked; prompts where it does not are skipped)."""
    root = root or stdlib_root()
    _, held = split_files(stdlib_files(root), heldout_frac)
    order = sorted(held, key=lambda r: _h(f"prompt{seed}:{r}"))
    out = []
    for rel in order:
        if len(out) >= n:
            break
        text = _read(root, rel)
        if not text:
            continue
        lines = text.splitlines(keepends=True)
        if len(lines) < 8:
            continue
        start_line = _h(f"line{seed}:{rel}") % max(1, len(lines) // 2)
        body = "".join(lines[start_line:])
        ids = tok.backend_tokenizer.encode(body, add_special_tokens=False).ids
        if len(ids) < prompt_tokens * 2:
            continue
        ids = ids[:prompt_tokens]
        ptxt = tok.decode(ids)
        if tok.backend_tokenizer.encode(ptxt, add_special_tokens=False).ids != ids:
            continue
        out.append({"file": rel.replace(os.sep, "/"), "text": ptxt, "token_ids": ids})
    return out


# --------------------------------------------------------------------------------------
# DFlash drafter: model (mirrors vLLM qwen3_dflash.py), masks, loss
# --------------------------------------------------------------------------------------

def default_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """Spread from layer 1 to the deepest layer vLLM can capture (L-2), like DFlash's rule
    (which spreads 1..L-3 for big targets)."""
    hi = num_target_layers - 2
    lo = min(1, hi)
    if num_features <= 1:
        return [hi]
    ids = sorted({int(round(lo + i * (hi - lo) / (num_features - 1))) for i in range(num_features)})
    return ids


def default_gamma(block_size: int) -> float:
    """Loss-decay gamma: 7 for B=16 (community b16 recipes), 4 for B=8 (ModelOpt)."""
    return {16: 7.0, 8: 4.0}.get(block_size, 7.0 * block_size / 16)


def dflash_loss_weights(block_size: int, gamma: float | None = None) -> torch.Tensor:
    """[B] weights: 0 for position 0 (the anchor/bonus token), exp(-(k-1)/gamma) for k>=1."""
    gamma = default_gamma(block_size) if gamma is None else gamma
    k = torch.arange(block_size, dtype=torch.float32)
    w = torch.exp(-(k - 1) / gamma)
    w[0] = 0.0
    return w


def sample_anchors(lo: torch.Tensor, hi: torch.Tensor, num: int, generator: torch.Generator) -> torch.Tensor:
    """Per sequence i, ``num`` distinct sorted anchors in [lo[i], hi[i]] (inclusive).
    Rows with fewer candidates are padded with -1."""
    out = torch.full((len(lo), num), -1, dtype=torch.long)
    for i, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
        n = b - a + 1
        if n <= 0:
            continue
        k = min(num, n)
        pick = torch.randperm(n, generator=generator)[:k] + a
        out[i, :k] = pick.sort().values
    return out


def build_blocks(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int):
    """DFlash training blocks.

    tokens [b, S]; anchors [b, N] (-1 = unused). Returns, each [b, N*B]:
      input_ids: block n = [tokens[a_n], MASK, ..., MASK]
      positions: a_n + k
      labels:    tokens[a_n + k] for k >= 1 (and a_n + k < S), else -100
      depth:     k (0..B-1)
    """
    b, S = tokens.shape
    N = anchors.shape[1]
    k = torch.arange(block_size)
    pos = anchors[:, :, None] + k  # [b, N, B]
    valid_anchor = anchors >= 0
    ids = torch.full((b, N, block_size), mask_token_id, dtype=torch.long)
    ids[:, :, 0] = torch.where(valid_anchor, tokens.gather(1, anchors.clamp(min=0)), mask_token_id)
    in_range = (pos < S) & valid_anchor[:, :, None] & (k > 0)
    labels = torch.where(in_range, tokens.gather(1, pos.clamp(0, S - 1).view(b, -1)).view(b, N, block_size),
                         torch.full_like(pos, -100))
    positions = torch.where(valid_anchor[:, :, None], pos, k.expand_as(pos))
    depth = k.expand(b, N, block_size)
    return (ids.view(b, -1), positions.reshape(b, -1), labels.view(b, -1), depth.reshape(b, -1))


def dflash_attention_mask(anchors: torch.Tensor, ctx_len: int, block_size: int) -> torch.Tensor:
    """Boolean mask [b, N*B, ctx_len + N*B] (True = may attend).

    Keys are [context positions 0..ctx_len-1, then the N*B block tokens]. A block query sees the
    context strictly before its anchor, and every token of its own block (bidirectional); blocks
    never see each other. This is what vLLM computes at inference: context K/V live in the cache
    for positions < anchor, and the 1+K query tokens attend non-causally to each other.
    """
    b, N = anchors.shape
    Q = N * block_size
    a = anchors.clamp(min=0).repeat_interleave(block_size, dim=1)  # [b, Q]
    ctx_ok = torch.arange(ctx_len)[None, None, :] < a[:, :, None]
    blk = torch.arange(Q) // block_size
    blk_ok = (blk[:, None] == blk[None, :]).expand(b, Q, Q)
    return torch.cat([ctx_ok, blk_ok], dim=-1)


class _RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dt)


class _Attn(nn.Module):
    def __init__(self, H, nh, nkv, hd, eps):
        super().__init__()
        self.nh, self.nkv, self.hd = nh, nkv, hd
        self.q_proj = nn.Linear(H, nh * hd, bias=False)
        self.k_proj = nn.Linear(H, nkv * hd, bias=False)
        self.v_proj = nn.Linear(H, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, H, bias=False)
        self.q_norm = _RMSNorm(hd, eps)
        self.k_norm = _RMSNorm(hd, eps)


class _MLP(nn.Module):
    def __init__(self, H, inter):
        super().__init__()
        self.gate_proj = nn.Linear(H, inter, bias=False)
        self.up_proj = nn.Linear(H, inter, bias=False)
        self.down_proj = nn.Linear(inter, H, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, H, nh, nkv, hd, inter, eps):
        super().__init__()
        self.self_attn = _Attn(H, nh, nkv, hd, eps)
        self.mlp = _MLP(H, inter)
        self.input_layernorm = _RMSNorm(H, eps)
        self.post_attention_layernorm = _RMSNorm(H, eps)


def _rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float):
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    f = positions.to(torch.float32)[..., None] * inv  # [..., hd/2]
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) RoPE, as in HF Qwen3 and vLLM's default is_neox_style=True.
    x [b, L, heads, hd]; cos/sin [b, L, hd]."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    rot = torch.cat([-x2, x1], dim=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return (x.float() * c + rot.float() * s).to(x.dtype)


class DFlashDrafter(nn.Module):
    """The DFlash draft network, parameter names identical to the checkpoint's (no ``model.``).

    ``forward`` reproduces vLLM 0.32 ``DFlashQwen3Model`` math (see module docstring).
    """

    def __init__(self, *, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 head_dim: int, intermediate_size: int, num_features: int, rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.layers = nn.ModuleList(
            [_Layer(hidden_size, num_heads, num_kv_heads, head_dim, intermediate_size, rms_norm_eps)
             for _ in range(num_layers)])
        self.fc = nn.Linear(hidden_size * num_features, hidden_size, bias=False)
        self.hidden_norm = _RMSNorm(hidden_size, rms_norm_eps)
        self.norm = _RMSNorm(hidden_size, rms_norm_eps)

    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None):
        for n, p in self.named_parameters():
            if n.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                with torch.no_grad():
                    p.normal_(0.0, std, generator=generator)

    def fuse(self, aux: torch.Tensor) -> torch.Tensor:
        """combine_hidden_states (fc) then hidden_norm: [.., nf*H] -> [.., H]."""
        return self.hidden_norm(self.fc(aux))

    def forward(self, block_embeds: torch.Tensor, block_pos: torch.Tensor, ctx: torch.Tensor,
                ctx_pos: torch.Tensor, attn_mask: torch.Tensor,
                context_k_norm: str = "per_layer") -> torch.Tensor:
        """block_embeds [b, Q, H] (target embed of [anchor, MASK...]), block_pos [b, Q],
        ctx [b, S, H] fused context features (``fuse`` output), ctx_pos [b, S],
        attn_mask [b, Q, S+Q] bool. Returns the final-normed hidden states [b, Q, H].

        context_k_norm: the k_norm of the context keys, "per_layer" (the model
        as trained: each layer's own) or "first_layer" (what vLLM 0.32's
        DFlash computes: its context-KV precompute stacks the layers' k_norm
        weights to [L, head_dim] and calls ops.rms_norm, which reads only the
        first head_dim weights, so every layer's context keys are normed with
        layer 0's k_norm weight; the replay lab records with it)."""
        b, Q, _ = block_embeds.shape
        S = ctx.shape[1]
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        cq, sq = _rope_cos_sin(block_pos, hd, self.rope_theta)
        cc, sc = _rope_cos_sin(ctx_pos, hd, self.rope_theta)
        mask = attn_mask[:, None]
        h = block_embeds
        for layer in self.layers:
            a = layer.self_attn
            x = layer.input_layernorm(h)
            q = _apply_rope(a.q_norm(a.q_proj(x).view(b, Q, nh, hd)), cq, sq)
            k = _apply_rope(a.k_norm(a.k_proj(x).view(b, Q, nkv, hd)), cq, sq)
            v = a.v_proj(x).view(b, Q, nkv, hd)
            # context K/V: from the fused target features, no input_layernorm (as in vLLM)
            ctx_norm = self.layers[0].self_attn.k_norm if context_k_norm == "first_layer" else a.k_norm
            kc = _apply_rope(ctx_norm(a.k_proj(ctx).view(b, S, nkv, hd)), cc, sc)
            vc = a.v_proj(ctx).view(b, S, nkv, hd)
            K = torch.cat([kc, k.to(kc.dtype)], 1).transpose(1, 2)
            V = torch.cat([vc, v.to(vc.dtype)], 1).transpose(1, 2)
            q = q.transpose(1, 2)
            if nh != nkv:
                K = K.repeat_interleave(nh // nkv, dim=1)
                V = V.repeat_interleave(nh // nkv, dim=1)
            o = F.scaled_dot_product_attention(q, K.to(q.dtype), V.to(q.dtype), attn_mask=mask)
            h = h + a.o_proj(o.transpose(1, 2).reshape(b, Q, nh * hd))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.norm(h)


def _drafter_from_config(cfg: dict[str, Any]) -> DFlashDrafter:
    nf = len(cfg["dflash_config"]["target_layer_ids"])
    rp = cfg.get("rope_parameters") or {}
    return DFlashDrafter(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"],
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        intermediate_size=cfg["intermediate_size"], num_features=nf,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rp.get("rope_theta", cfg.get("rope_theta", 10000.0)),
    )


def drafter_config(target_cfg: dict[str, Any], *, num_layers: int, block_size: int,
                   target_layer_ids: list[int], mask_token_id: int, dtype: str) -> dict[str, Any]:
    """z-lab DFlashDraftModel config.json derived from the target's config."""
    T = target_cfg["num_hidden_layers"]
    cfg = {k: v for k, v in target_cfg.items() if k not in ("auto_map", "torch_dtype", "_name_or_path")}
    cfg.update(
        architectures=["DFlashDraftModel"], model_type="qwen3", num_hidden_layers=num_layers,
        num_target_layers=T, block_size=block_size, layer_types=["full_attention"] * num_layers,
        max_window_layers=num_layers, use_sliding_window=False, sliding_window=None,
        dflash_config={"mask_token_id": int(mask_token_id), "target_layer_ids": [int(i) for i in target_layer_ids]},
        dtype=dtype,
    )
    return cfg


def save_drafter(model: DFlashDrafter, cfg: dict[str, Any], out_dir: str, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    sd = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)


def load_drafter(drafter_dir: str, dtype: torch.dtype = torch.float32) -> tuple[DFlashDrafter, dict[str, Any]]:
    from safetensors.torch import load_file

    with open(os.path.join(drafter_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    m = _drafter_from_config(cfg)
    sd = load_file(os.path.join(drafter_dir, "model.safetensors"))
    m.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    return m.to(dtype), cfg


# --------------------------------------------------------------------------------------
# Drafter data + training
# --------------------------------------------------------------------------------------

def _load_target(target_dir: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32, attn_implementation="sdpa")
    m.eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@torch.no_grad()
def _target_features(target, tokens: torch.Tensor, layer_ids: list[int], autocast: bool,
                     batch: int = 16) -> torch.Tensor:
    """Concatenated outputs of target decoder layers ``layer_ids`` (the residual stream after
    layer i == vLLM aux hidden state i+1), [n, S, nf*H], float32."""
    caught: dict[int, torch.Tensor] = {}
    hooks = []
    for i in layer_ids:
        def hook(_m, _inp, out, i=i):
            caught[i] = (out[0] if isinstance(out, tuple) else out).float()
        hooks.append(target.model.layers[i].register_forward_hook(hook))
    outs = []
    try:
        for s in range(0, len(tokens), batch):
            caught.clear()
            with _autocast(autocast):
                target.model(input_ids=tokens[s: s + batch])
            outs.append(torch.cat([caught[i] for i in layer_ids], dim=-1))
    finally:
        for h in hooks:
            h.remove()
    return torch.cat(outs)


@torch.no_grad()
def generate_continuations(target, prompts: torch.Tensor, gen_len: int, *, temperature: float = 0.0,
                           generator: torch.Generator | None = None, autocast: bool = True) -> torch.Tensor:
    """Greedy (temperature 0) or sampled continuations with a KV cache. prompts [n, P] (equal length).
    Returns [n, P + gen_len]."""
    with _autocast(autocast):
        out = target(input_ids=prompts, use_cache=True)
    past, logits = out.past_key_values, out.logits[:, -1].float()
    toks = []
    for _ in range(gen_len):
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        toks.append(nxt)
        with _autocast(autocast):
            out = target(input_ids=nxt[:, None], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[:, -1].float()
    return torch.cat([prompts, torch.stack(toks, 1)], 1)


def _make_drafter_data(target, stream: torch.Tensor, spec: DrafterSpec, n: int, seed: int,
                       log: Log, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences [n, seq_len] and anchor lower bounds [n] (first position whose token is a
    target continuation, or 1 for corpus data)."""
    g = torch.Generator().manual_seed(seed)
    L = spec.seq_len
    seqs, lo = [], []
    t0 = time.time()
    if spec.data == "corpus":
        starts = torch.randint(0, len(stream) - L, (n,), generator=g)
        return torch.stack([stream[s: s + L] for s in starts.tolist()]), torch.ones(n, dtype=torch.long)
    nb = math.ceil(n / spec.gen_batch)
    n_sampled_batches = int(round(spec.sample_frac * nb))
    for bi in range(nb):
        m = min(spec.gen_batch, n - bi * spec.gen_batch)
        P = spec.prompt_lens[bi % len(spec.prompt_lens)]
        starts = torch.randint(0, len(stream) - P, (m,), generator=g)
        prompts = torch.stack([stream[s: s + P] for s in starts.tolist()])
        temp = spec.sample_temperature if bi >= nb - n_sampled_batches else 0.0
        seqs.append(generate_continuations(target, prompts, L - P, temperature=temp, generator=g,
                                           autocast=spec.autocast))
        lo.append(torch.full((m,), P, dtype=torch.long))
        if (bi + 1) % 4 == 0 or bi == nb - 1:
            log(f"[drafter] {tag} data: generated {sum(len(s) for s in seqs)}/{n} sequences "
                f"({time.time() - t0:.0f}s)")
    return torch.cat(seqs), torch.cat(lo)


def _drafter_logits_and_labels(drafter, embed, lm_head, tokens, feats, anchors, B, mask_id):
    ids, pos, labels, depth = build_blocks(tokens, anchors, B, mask_id)
    b, S = tokens.shape
    ctx = drafter.fuse(feats)
    ctx_pos = torch.arange(S).expand(b, S)
    mask = dflash_attention_mask(anchors, S, B)
    h = drafter(embed(ids), pos, ctx, ctx_pos, mask)
    sel = labels >= 0
    logits = lm_head(h[sel]).float()
    return logits, labels[sel], depth[sel]


@torch.no_grad()
def evaluate_drafter(drafter, target, tokens, feats, lo, block_size, mask_id, *, autocast: bool = True,
                     topk: int = 8, batch: int = 4, anchors_per_pass: int = 32) -> dict[str, Any]:
    """Held-out drafter quality on sequences the target generated greedily from ``lo`` on.

    * per-depth top-1 / top-k accuracy over *every* anchor in [lo, S-B];
    * ``chain_*``: the greedy chain-verification walk vLLM performs (anchor = lo; accept the
      leading correct top-1 drafts n; next anchor = anchor + n + 1), i.e. the acceptance vLLM's
      ``dflash`` method reports on these sequences. Anchors the walk visits sit right after a
      rejection, so this is much lower than the all-anchor average (``all_anchor_accepted_mean``).
    """
    drafter.eval()
    B = block_size
    S = tokens.shape[1]
    D = B - 1
    top1 = torch.zeros(D)
    topk_c = torch.zeros(D)
    alt = torch.zeros(D)   # top-1 wrong but label within top-2..top-k
    cnt = torch.zeros(D)
    lead_all = []          # per sequence: {anchor: leading-correct count}
    for s in range(0, len(tokens), batch):
        tk, ft, lw = tokens[s: s + batch], feats[s: s + batch], lo[s: s + batch]
        n_anc = max(0, S - B - int(lw.min()) + 1)
        all_anchors = torch.full((len(tk), n_anc), -1, dtype=torch.long)
        for i, l0 in enumerate(lw.tolist()):
            a = torch.arange(l0, S - B + 1)
            all_anchors[i, : len(a)] = a
        with _autocast(autocast):
            ctx = drafter.fuse(ft)
        ctx_pos = torch.arange(S).expand(len(tk), S)
        leads = torch.zeros(len(tk), n_anc, dtype=torch.long)
        for c in range(0, n_anc, anchors_per_pass):
            anchors = all_anchors[:, c: c + anchors_per_pass]
            ids, pos, labels, depth = build_blocks(tk, anchors, B, mask_id)
            with _autocast(autocast):
                h = drafter(target.model.embed_tokens(ids), pos, ctx, ctx_pos,
                            dflash_attention_mask(anchors, S, B))
                logits = target.lm_head(h).float()
            tops = logits.topk(topk, -1).indices  # [b, Q, k]
            hit1 = tops[..., 0] == labels
            hitk = (tops == labels[..., None]).any(-1)
            valid = labels >= 0
            for d in range(1, B):
                m = valid & (depth == d)
                cnt[d - 1] += m.sum()
                top1[d - 1] += (hit1 & m).sum()
                topk_c[d - 1] += (hitk & m).sum()
                alt[d - 1] += (hitk & ~hit1 & m).sum()
            h1 = hit1.view(len(tk), -1, B)[..., 1:]
            leads[:, c: c + anchors.shape[1]] = torch.cumprod(h1.long(), -1).sum(-1)
        for i in range(len(tk)):
            ok = all_anchors[i] >= 0
            lead_all.append(dict(zip(all_anchors[i][ok].tolist(), leads[i][ok].tolist())))
    drafter.train()
    # the chain walk
    steps, acc, per_pos, every = 0, 0, [0] * D, []
    for i, table in enumerate(lead_all):
        every.extend(table.values())
        a = int(lo[i])
        while a in table:
            n = table[a]
            steps += 1
            acc += n
            for j in range(n):
                per_pos[j] += 1
            a += n + 1
    chain = acc / max(1, steps)
    return {
        "top1_by_depth": [round(float(x), 4) for x in top1 / cnt.clamp(min=1)],
        f"top{topk}_by_depth": [round(float(x), 4) for x in topk_c / cnt.clamp(min=1)],
        f"top1_wrong_in_top{topk}_by_depth": [round(float(x), 4) for x in alt / cnt.clamp(min=1)],
        "chain_accepted_mean": round(chain, 4),          # accepted drafts per step (no bonus)
        "chain_tau": round(chain + 1, 4),                # tokens per step incl. the bonus
        "chain_accept_rate_by_pos": [round(x / max(1, steps), 4) for x in per_pos],
        "chain_steps": steps,
        "all_anchor_accepted_mean": round(sum(every) / max(1, len(every)), 4),
        "anchors": len(every),
    }


def train_drafter(target_dir: str, out_dir: str, spec: DrafterSpec | None = None, *, seed: int = 0,
                  root: str | None = None, log: Log = _print) -> dict[str, Any]:
    """Train a DFlash drafter for the target in ``target_dir``; write z-lab format to out_dir."""
    spec = spec or DrafterSpec()
    t0 = time.time()
    root = root or stdlib_root()
    with open(os.path.join(target_dir, "config.json"), encoding="utf-8") as f:
        tcfg = json.load(f)
    tmeta = {}
    if os.path.exists(os.path.join(target_dir, META_FILE)):
        with open(os.path.join(target_dir, META_FILE), encoding="utf-8") as f:
            tmeta = json.load(f)
    heldout_frac = tmeta.get("spec", {}).get("heldout_frac", 0.05)
    max_chars = tmeta.get("spec", {}).get("max_train_chars", None)
    T = tcfg["num_hidden_layers"]
    layer_ids = spec.target_layer_ids or default_target_layer_ids(T, spec.num_features)
    if not all(0 <= i <= T - 2 for i in layer_ids) or sorted(layer_ids) != list(layer_ids):
        raise ValueError(f"target_layer_ids {layer_ids} must be sorted and within [0, {T - 2}]")
    B = spec.block_size
    gamma = default_gamma(B) if spec.gamma is None else spec.gamma
    tok = _load_tokenizer(target_dir)
    mask_id = tok.convert_tokens_to_ids(MASK_TOKEN)
    if mask_id is None or mask_id == getattr(tok, "unk_token_id", None):
        mask_id = tok.pad_token_id
    target = _load_target(target_dir)
    save_dtype = spec.save_dtype or str(tcfg.get("dtype") or tcfg.get("torch_dtype") or "bfloat16")

    train_rels, _ = split_files(stdlib_files(root), heldout_frac)
    # a different slice of the training files than the target saw first (seed+7), same split
    train_stream = _encode_stream(tok, [t for _, t in _ordered_texts(root, train_rels, max_chars or 4_000_000, seed + 7)])

    torch.manual_seed(seed)
    train_tok, train_lo = _make_drafter_data(target, train_stream, spec, spec.num_sequences, seed + 11, log, "train")
    # eval: greedy continuations of the held-out benchmark prompts (what vLLM will be run on)
    prompts = heldout_prompts(tok, n=spec.eval_sequences, prompt_tokens=spec.eval_prompt_len, root=root,
                              heldout_frac=heldout_frac)
    eval_tok = generate_continuations(target, torch.tensor([p["token_ids"] for p in prompts]),
                                      spec.seq_len - spec.eval_prompt_len, autocast=spec.autocast)
    eval_lo = torch.full((len(eval_tok),), spec.eval_prompt_len, dtype=torch.long)
    t_gen = time.time() - t0
    feat_dtype = torch.bfloat16 if spec.autocast else torch.float32   # storage only
    train_feats = _target_features(target, train_tok, layer_ids, spec.autocast).to(feat_dtype)
    eval_feats = _target_features(target, eval_tok, layer_ids, spec.autocast).to(feat_dtype)
    log(f"[drafter] data: {len(train_tok)} train / {len(eval_tok)} eval sequences of {spec.seq_len} "
        f"({spec.data}), features from target layers {layer_ids}; {time.time() - t0:.0f}s")

    drafter = DFlashDrafter(
        hidden_size=tcfg["hidden_size"], num_layers=spec.num_layers,
        num_heads=tcfg["num_attention_heads"], num_kv_heads=tcfg["num_key_value_heads"],
        head_dim=tcfg["head_dim"], intermediate_size=tcfg["intermediate_size"],
        num_features=len(layer_ids), rms_norm_eps=tcfg.get("rms_norm_eps", 1e-6),
        rope_theta=(tcfg.get("rope_parameters") or {}).get("rope_theta", tcfg.get("rope_theta", 10000.0)),
    )
    drafter.init_weights(generator=torch.Generator().manual_seed(seed + 17))
    if spec.init_from_target:
        src = target.model.layers[T - spec.num_layers:] if spec.num_layers <= T else []
        for dl, tl in zip(drafter.layers, src):
            dl.load_state_dict(tl.state_dict(), strict=False)
    drafter.train()
    n_params = sum(p.numel() for p in drafter.parameters())
    embed, lm_head = target.model.embed_tokens, target.lm_head
    w_depth = dflash_loss_weights(B, gamma)
    opt = torch.optim.AdamW(_param_groups(drafter, spec.weight_decay), lr=spec.lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(seed + 19)
    n = len(train_tok)
    steps_per_epoch = math.ceil(n / spec.batch_size)
    total = steps_per_epoch * spec.epochs
    log(f"[drafter] {spec.num_layers} layers, block {B}, gamma {gamma}, {n_params / 1e6:.2f}M params; "
        f"{total} steps x {spec.batch_size} seqs x {spec.num_anchors} anchors")
    t_train = time.time()
    step, ema = 0, None
    S = spec.seq_len
    for ep in range(spec.epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, spec.batch_size):
            idx = perm[s: s + spec.batch_size]
            tk, ft, lw = train_tok[idx], train_feats[idx].float(), train_lo[idx]
            anchors = sample_anchors(lw, torch.full_like(lw, S - B), spec.num_anchors, g)
            lr = _lr_at(step, total, spec.lr, spec.warmup, spec.min_lr_frac)
            for grp in opt.param_groups:
                grp["lr"] = lr
            with _autocast(spec.autocast):
                logits, labels, depth = _drafter_logits_and_labels(drafter, embed, lm_head, tk, ft, anchors, B, mask_id)
            ce = F.cross_entropy(logits, labels, reduction="none")
            w = w_depth[depth]
            loss = (ce * w).sum() / w.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(drafter.parameters(), spec.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            lv = loss.item()
            ema = lv if ema is None else 0.9 * ema + 0.1 * lv
            if step % spec.log_every == 0 or step == total:
                el = time.time() - t_train
                log(f"[drafter] epoch {ep + 1} step {step}/{total} loss {ema:.3f} lr {lr:.2e} {el:.0f}s")
    train_s = time.time() - t_train
    ev = evaluate_drafter(drafter, target, eval_tok, eval_feats.float(), eval_lo, B, mask_id,
                          autocast=spec.autocast)
    log(f"[drafter] held-out greedy chain walk: accepted/step {ev['chain_accepted_mean']:.3f} "
        f"(tau {ev['chain_tau']:.3f}, {ev['chain_steps']} steps); per position: "
        + " ".join(f"{x:.2f}" for x in ev["chain_accept_rate_by_pos"]))
    log(f"[drafter] all-anchor accepted mean {ev['all_anchor_accepted_mean']:.3f} over {ev['anchors']} anchors")
    log("[drafter] top1 by depth: " + " ".join(f"{x:.2f}" for x in ev["top1_by_depth"]))
    log("[drafter] top8 by depth: " + " ".join(f"{x:.2f}" for x in ev["top8_by_depth"]))
    cfg = drafter_config(tcfg, num_layers=spec.num_layers, block_size=B, target_layer_ids=layer_ids,
                         mask_token_id=mask_id, dtype=save_dtype)
    save_drafter(drafter, cfg, out_dir, _dtype(save_dtype))
    metrics = dict(ev, params=n_params, train_seconds=round(train_s, 1), data_seconds=round(t_gen, 1),
                   wall_seconds=round(time.time() - t0, 1), train_blocks=total * spec.batch_size * spec.num_anchors,
                   gamma=gamma, target_layer_ids=layer_ids, mask_token_id=mask_id)
    meta = {"kind": "dflash_drafter", "seed": seed, "target": os.path.basename(os.path.abspath(target_dir)),
            "spec": asdict(spec), "metrics": metrics, "env": _env()}
    with open(os.path.join(out_dir, META_FILE), "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
    return metrics


# --------------------------------------------------------------------------------------
# Pairs
# --------------------------------------------------------------------------------------

DEFAULT_TARGET = TargetSpec()
DEFAULT_DRAFTER = DrafterSpec()
TEST_TARGET = TargetSpec(
    vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
    intermediate_size=384, seq_len=256, batch_size=16, steps=160, lr=3e-3, warmup=20,
    save_dtype="float32", max_train_chars=3_000_000, tokenizer_max_chars=2_000_000,
    eval_windows=32, log_every=40,
    # float32 throughout: bf16 autocast is ~8x slower on CPUs without native bf16
    # (AVX2: 15 min instead of 2 for the whole pair)
    autocast=False,
)
TEST_DRAFTER = DrafterSpec(
    num_layers=1, block_size=8, num_features=2, num_sequences=384, seq_len=192,
    prompt_lens=(32, 64), gen_batch=192, num_anchors=16, batch_size=8, epochs=12, lr=3e-3,
    warmup=10, autocast=False, save_dtype="float32", eval_sequences=32, log_every=96,
)


def build_pair(out_dir: str, target_spec: TargetSpec, drafter_spec: DrafterSpec, *, seed: int = 0,
               log: Log = _print) -> dict[str, Any]:
    t0 = time.time()
    tdir, ddir = os.path.join(out_dir, "target"), os.path.join(out_dir, "drafter")
    tm = train_target(tdir, target_spec, seed=seed, log=log)
    dm = train_drafter(tdir, ddir, drafter_spec, seed=seed, log=log)
    wall = time.time() - t0
    log(f"[pair] done in {wall:.0f}s: {out_dir}")
    return {"target": tm, "drafter": dm, "wall_seconds": round(wall, 1), "target_dir": tdir, "drafter_dir": ddir}


def build_default_pair(out_dir: str | None = None, *, seed: int = 0, log: Log = _print) -> dict[str, Any]:
    """The demo/benchmark pair shipped in ``assets/pair`` (~25 min on a 2-core CPU): a 6.8M-param
    bf16 Qwen3 target (6 layers, hidden 256, vocab 4096) + a 1.8M-param 2-layer block-16 DFlash
    drafter reading target layers [1, 2, 4]. Writes out_dir/{target,drafter}."""
    return build_pair(out_dir or default_pair_dir(), DEFAULT_TARGET, DEFAULT_DRAFTER, seed=seed, log=log)


def build_test_pair(out_dir: str, *, seed: int = 0, log: Log = _print) -> dict[str, Any]:
    """A tiny float32 pair for tests (~2 min on a 2-core CPU): 0.92M-param 4-layer h128
    target (vocab 512, head_dim 32) + 0.23M-param 1-layer block-8 drafter (run it with
    num_speculative_tokens=7). Writes out_dir/{target,drafter}."""
    return build_pair(out_dir, TEST_TARGET, TEST_DRAFTER, seed=seed, log=log)


def default_pair_dir() -> str:
    """Folder of the shipped pair: ``<package>/assets/pair`` with ``target/`` and ``drafter/``."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "pair")


def default_pair_paths() -> tuple[str, str]:
    d = default_pair_dir()
    return os.path.join(d, "target"), os.path.join(d, "drafter")
