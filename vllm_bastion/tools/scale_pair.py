"""Function-preserving widening of a trained (Qwen3 target, DFlash drafter) pair.

The widened pair has the shape, parameter count and therefore the compute and
memory traffic of a much bigger model, and exactly the predictions of the
small trained pair (every weight and eps is copied bit-exactly, in bf16 too),
so speculative-decoding acceptance stays real while step costs become
realistic. Nothing here imports vLLM.

How (source hidden h = q_heads x head_dim, widened hidden H = t * h):

* **Residual tiling.** The widened residual stream is t identical copies of
  the source residual. Embeddings are tiled (each row repeated t times); every
  matrix that *writes* the residual (o_proj, down_proj, the drafter's fc) has
  its live rows repeated once per copy; RMSNorm weights are tiled, and the RMS
  over t identical copies equals the source RMS, so every norm weight and eps
  stays as it was.
* **Readers read one copy.** The live rows of every matrix that *reads* the
  residual (q/k/v, gate/up, lm_head, fc's inputs) hold the source weights on
  one copy's columns and zeros on the others; the copy varies per layer.
* **Dead heads, units and layers.** head_dim is kept; the source KV heads are
  spread over the widened KV heads and each source q head is placed in the
  group of its own KV head under vLLM's/HF's grouping (q head i uses KV head
  i // (q_heads / kv_heads)). Dead q/k/v heads, dead FFN units and every
  reader of a dead layer hold small random values (std 0.02, seeded per
  tensor) so the compute is dense and realistic; their outputs meet zero
  columns of o_proj / down_proj, and a dead layer's writers are all zero, so
  the residual passes through it untouched. The source layers are spread over
  the widened depth and the drafter's ``target_layer_ids`` are remapped to the
  widened index of the same source layer (the aux hidden state of layer i is
  the residual after layer i; dead layers after it do not change it).
* **Drafter.** Widened the same way, to the target's widened width (as z-lab
  drafters share their target's width), keeping its z-lab ``DFlashDraftModel``
  config format; fc reads source feature f from one copy of widened feature f
  and writes every copy.

Entry points: :func:`ensure_scaled_pair` (build into the cache on first use,
return the paths), :func:`build_scaled_pair` (build into a folder),
:data:`SHAPES`, and the fp32 comparisons :func:`compare_targets` /
:func:`compare_drafters` used by ``scripts/scale_pair.py --check`` and the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch

__all__ = [
    "PairShape", "SHAPES", "WideningPlan", "plan_widening", "widen_target", "widen_drafter",
    "build_scaled_pair", "ensure_scaled_pair", "scaled_pair_dir", "cache_root",
    "compare_targets", "compare_drafters", "drafter_block_logits", "count_params",
    "SCALED_META_FILE", "FORMAT_VERSION",
]

Log = Callable[[str], None]

SCALED_META_FILE = "scaled_pair.json"
FORMAT_VERSION = 1            # bump when the widening changes: cached pairs are rebuilt
DEAD_STD = 0.02               # scale of the random dead reader weights
MAX_SHARD_BYTES = 1 << 30     # safetensors shard size: bounds the build's peak memory
# files copied from the source target (everything vLLM / transformers need besides weights)
TARGET_EXTRA_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "chat_template.jinja", "generation_config.json", "heldout_prompts.json",
                      "vocab.json", "merges.txt")


def _print(msg: str) -> None:
    print(msg, flush=True)


@dataclass(frozen=True)
class PairShape:
    """Widened shape. head_dim and vocab come from the source pair."""
    name: str
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_hidden_layers: int
    drafter_layers: int       # total drafter layers (the source's live layers + dead ones)
    note: str = ""


# Named after the Qwen3 sizes whose hidden / FFN / depth / GQA ratio they copy (with our
# head_dim 64 the head count doubles so that hidden = heads x head_dim).
#
# Drafter depth: the source drafter's 2 trained layers, no dead ones. What matters for
# speculation is the cost of a drafter step relative to a target step, not the layer count. On
# a GPU a DFlash step (16 query tokens) is memory-bound like a decode step: z-lab-style 5-layer
# drafters of 36-layer Qwen3 targets read ~20% of the target's bytes (with the shared lm_head).
# Here the 2-layer drafter reads 9% of the 0.6b target's bytes (32.5M of 361M params), and on
# this CPU 16 tokens cost ~2x one token, so its step lands near that GPU ratio (0.1-0.35 of a
# target decode step measured on a noisy shared 2-core machine, torch and vLLM); 4 layers
# (z-lab's 5/36 depth share of 28) read 16% and cost ~1.3-1.5x more. For a deeper drafter, pass
# a PairShape with more drafter_layers (dead layers are added) to ensure_scaled_pair.
SHAPES: dict[str, PairShape] = {
    "0.6b": PairShape("0.6b", hidden_size=1024, num_attention_heads=16, num_key_value_heads=8,
                      intermediate_size=3072, num_hidden_layers=28, drafter_layers=2,
                      note="Qwen3-0.6B's hidden/FFN/depth; ~0.36B params with a 4096 vocab"),
    "1.7b": PairShape("1.7b", hidden_size=2048, num_attention_heads=32, num_key_value_heads=16,
                      intermediate_size=6144, num_hidden_layers=28, drafter_layers=2,
                      note="Qwen3-1.7B's hidden/FFN/depth; ~1.4B params with a 4096 vocab"),
}


# --------------------------------------------------------------------------------------
# The plan: where every source head / unit / layer goes
# --------------------------------------------------------------------------------------

def _spread(n_live: int, n_total: int) -> list[int]:
    """n_live distinct increasing positions in [0, n_total), evenly spread, first 0, last n_total-1."""
    if n_live > n_total:
        raise ValueError(f"cannot place {n_live} items in {n_total} slots")
    if n_live == 1:
        return [0]
    d = n_live - 1
    return [(2 * i * (n_total - 1) + d) // (2 * d) for i in range(n_live)]  # round half up


@dataclass(frozen=True)
class WideningPlan:
    head_dim: int
    src_hidden: int
    hidden: int
    tiles: int                       # t = hidden / src_hidden copies of the residual
    src_q_heads: int
    src_kv_heads: int
    q_heads: int
    kv_heads: int
    kv_pos: tuple[int, ...]          # widened index of source kv head j
    q_pos: tuple[int, ...]           # widened index of source q head i
    src_inter: int
    inter: int
    src_layers: int
    layers: int
    layer_pos: tuple[int, ...]       # widened index of source target layer i
    src_drafter_layers: int
    drafter_layers: int
    drafter_layer_pos: tuple[int, ...]
    src_target_layer_ids: tuple[int, ...]
    target_layer_ids: tuple[int, ...]

    def reader_copy(self, k: int) -> int:
        """Which residual copy the k-th reader reads (varies, so every copy is exercised)."""
        return k % self.tiles


def plan_widening(target_cfg: dict[str, Any], drafter_cfg: dict[str, Any], shape: PairShape) -> WideningPlan:
    hd = int(target_cfg.get("head_dim") or target_cfg["hidden_size"] // target_cfg["num_attention_heads"])
    h, nq, nkv = target_cfg["hidden_size"], target_cfg["num_attention_heads"], target_cfg["num_key_value_heads"]
    H, NQ, NKV = shape.hidden_size, shape.num_attention_heads, shape.num_key_value_heads
    if target_cfg.get("tie_word_embeddings"):
        raise ValueError("tied embeddings are not supported (lm_head reads one copy, embed is tiled)")
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size",
              "head_dim", "vocab_size", "rms_norm_eps"):
        if k in drafter_cfg and k in target_cfg and drafter_cfg[k] != target_cfg[k]:
            raise ValueError(f"drafter {k}={drafter_cfg[k]} differs from the target's {target_cfg[k]}")
    if H % h:
        raise ValueError(f"widened hidden {H} is not a multiple of the source hidden {h}")
    if nq % nkv or NQ % NKV:
        raise ValueError("q heads must be a multiple of kv heads")
    g, G = nq // nkv, NQ // NKV
    if NKV < nkv or G < g:
        raise ValueError(f"cannot place {nq}q/{nkv}kv heads into {NQ}q/{NKV}kv "
                         f"(need >= {nkv} kv heads and a group size >= {g})")
    kv_pos = _spread(nkv, NKV)
    q_pos = [kv_pos[i // g] * G + i % g for i in range(nq)]
    inter, L, LD = target_cfg["intermediate_size"], target_cfg["num_hidden_layers"], drafter_cfg["num_hidden_layers"]
    if shape.intermediate_size < inter or shape.num_hidden_layers < L or shape.drafter_layers < LD:
        raise ValueError(f"shape {shape.name} is smaller than the source pair")
    layer_pos = _spread(L, shape.num_hidden_layers)
    ids = list(drafter_cfg["dflash_config"]["target_layer_ids"])
    new_ids = [layer_pos[i] for i in ids]
    if any(not 0 <= i <= shape.num_hidden_layers - 2 for i in new_ids):
        raise ValueError(f"remapped target_layer_ids {new_ids} outside vLLM's capture range")
    return WideningPlan(
        head_dim=hd, src_hidden=h, hidden=H, tiles=H // h, src_q_heads=nq, src_kv_heads=nkv,
        q_heads=NQ, kv_heads=NKV, kv_pos=tuple(kv_pos), q_pos=tuple(q_pos),
        src_inter=inter, inter=shape.intermediate_size, src_layers=L, layers=shape.num_hidden_layers,
        layer_pos=tuple(layer_pos), src_drafter_layers=LD, drafter_layers=shape.drafter_layers,
        drafter_layer_pos=tuple(_spread(LD, shape.drafter_layers)),
        src_target_layer_ids=tuple(ids), target_layer_ids=tuple(new_ids))


# --------------------------------------------------------------------------------------
# Tensor builders (exact: every source value is copied, never rescaled)
# --------------------------------------------------------------------------------------

class _Rand:
    """Seeded small random values, one generator per tensor name (order-independent builds)."""

    def __init__(self, seed: int, dtype: torch.dtype):
        self.seed, self.dtype = seed, dtype

    def __call__(self, name: str, *shape: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return (torch.randn(*shape, generator=g) * DEAD_STD).to(self.dtype)


def _head_rows(pos: tuple[int, ...], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(p * hd, (p + 1) * hd) for p in pos])


def _reader(w: torch.Tensor, rows_out: int, live_rows: torch.Tensor, copy: int, plan: WideningPlan,
            rand: _Rand, name: str) -> torch.Tensor:
    """[out, h] source reader -> [rows_out, H]: random dead rows; live rows hold the source weights
    on residual copy ``copy`` and zeros on the other copies."""
    h = plan.src_hidden
    out = rand(name, rows_out, plan.hidden)
    out[live_rows] = 0
    out[live_rows, copy * h:(copy + 1) * h] = w.to(out.dtype)
    return out


def _writer(w: torch.Tensor, cols_in: int, live_cols: torch.Tensor, plan: WideningPlan) -> torch.Tensor:
    """[h, in] source writer -> [H, cols_in]: the source rows repeated once per residual copy on the
    live columns, zero columns for dead heads / units."""
    out = torch.zeros(plan.hidden, cols_in, dtype=w.dtype)
    out[:, live_cols] = w.repeat(plan.tiles, 1)
    return out


def _tile(w: torch.Tensor, plan: WideningPlan) -> torch.Tensor:
    return w.repeat(plan.tiles) if w.dim() == 1 else w.repeat(1, plan.tiles)


def _layer(src: dict[str, torch.Tensor] | None, prefix: str, k: int, plan: WideningPlan, rand: _Rand,
           dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """One widened decoder layer (names ``prefix + ...``). ``src`` maps the source layer's names
    without prefix (None: a dead layer). ``k`` picks the residual copy its readers read."""
    H, hd, NQ, NKV, I = plan.hidden, plan.head_dim, plan.q_heads, plan.kv_heads, plan.inter
    names = ("self_attn.q_proj", NQ * hd), ("self_attn.k_proj", NKV * hd), ("self_attn.v_proj", NKV * hd), \
            ("mlp.gate_proj", I), ("mlp.up_proj", I)
    if src is None:
        for n, rows in names:
            yield prefix + n + ".weight", rand(prefix + n, rows, H)
        yield prefix + "self_attn.o_proj.weight", torch.zeros(H, NQ * hd, dtype=dtype)
        yield prefix + "mlp.down_proj.weight", torch.zeros(H, I, dtype=dtype)
        for n in ("input_layernorm", "post_attention_layernorm"):
            yield prefix + n + ".weight", torch.ones(H, dtype=dtype)
        for n in ("self_attn.q_norm", "self_attn.k_norm"):
            yield prefix + n + ".weight", torch.ones(hd, dtype=dtype)
        return
    c = plan.reader_copy(k)
    q_rows, kv_rows = _head_rows(plan.q_pos, hd), _head_rows(plan.kv_pos, hd)
    units = torch.arange(plan.src_inter)
    live = {"self_attn.q_proj": q_rows, "self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows,
            "mlp.gate_proj": units, "mlp.up_proj": units}
    for n, rows in names:
        yield prefix + n + ".weight", _reader(src[n + ".weight"], rows, live[n], c, plan, rand, prefix + n).to(dtype)
    yield prefix + "self_attn.o_proj.weight", _writer(src["self_attn.o_proj.weight"], NQ * hd, q_rows, plan).to(dtype)
    yield prefix + "mlp.down_proj.weight", _writer(src["mlp.down_proj.weight"], I, units, plan).to(dtype)
    for n in ("input_layernorm", "post_attention_layernorm"):
        yield prefix + n + ".weight", _tile(src[n + ".weight"], plan).to(dtype)
    for n in ("self_attn.q_norm", "self_attn.k_norm"):     # per head_dim: unchanged, shared by all heads
        yield prefix + n + ".weight", src[n + ".weight"].to(dtype)


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def widen_target(src: dict[str, torch.Tensor], plan: WideningPlan, *, dtype: torch.dtype = torch.bfloat16,
                 seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Widened Qwen3ForCausalLM tensors, one at a time (HF names)."""
    rand = _Rand(seed, dtype)
    yield "model.embed_tokens.weight", _tile(src["model.embed_tokens.weight"], plan).to(dtype)
    inv = {p: i for i, p in enumerate(plan.layer_pos)}
    for L in range(plan.layers):
        s = _sub(src, f"model.layers.{inv[L]}.") if L in inv else None
        yield from _layer(s, f"model.layers.{L}.", L, plan, rand, dtype)
    yield "model.norm.weight", _tile(src["model.norm.weight"], plan).to(dtype)
    lm = src["lm_head.weight"]
    yield "lm_head.weight", _reader(lm, lm.shape[0], torch.arange(lm.shape[0]), plan.reader_copy(plan.layers),
                                    plan, rand, "lm_head").to(dtype)


def widen_drafter(src: dict[str, torch.Tensor], plan: WideningPlan, *, dtype: torch.dtype = torch.bfloat16,
                  seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Widened DFlash drafter tensors (z-lab names: fc, hidden_norm, layers.*, norm)."""
    known = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    extra = sorted(k for k in src if not k.startswith("layers.") and k not in known)
    if extra:
        raise ValueError(f"drafter tensors not supported by the widening: {extra} "
                         "(own embed_tokens / lm_head / d2t?)")
    rand = _Rand(seed + 7919, dtype)
    h, H, nf = plan.src_hidden, plan.hidden, len(plan.src_target_layer_ids)
    fc = src["fc.weight"]                       # [h, nf*h]
    assert fc.shape == (h, nf * h), fc.shape
    wide = torch.zeros(H, nf * H, dtype=fc.dtype)
    for f in range(nf):                          # feature f: read one copy, write every copy
        c = plan.reader_copy(f + 1)
        wide[:, f * H + c * h: f * H + (c + 1) * h] = fc[:, f * h:(f + 1) * h].repeat(plan.tiles, 1)
    yield "fc.weight", wide.to(dtype)
    yield "hidden_norm.weight", _tile(src["hidden_norm.weight"], plan).to(dtype)
    inv = {p: i for i, p in enumerate(plan.drafter_layer_pos)}
    for L in range(plan.drafter_layers):
        s = _sub(src, f"layers.{inv[L]}.") if L in inv else None
        yield from _layer(s, f"layers.{L}.", L + 1, plan, rand, dtype)
    yield "norm.weight", _tile(src["norm.weight"], plan).to(dtype)


def widened_target_config(cfg: dict[str, Any], plan: WideningPlan, dtype: torch.dtype) -> dict[str, Any]:
    out = dict(cfg)
    out.update(hidden_size=plan.hidden, intermediate_size=plan.inter, num_hidden_layers=plan.layers,
               num_attention_heads=plan.q_heads, num_key_value_heads=plan.kv_heads, head_dim=plan.head_dim,
               layer_types=["full_attention"] * plan.layers, max_window_layers=plan.layers,
               dtype=str(dtype).replace("torch.", ""))
    out.pop("torch_dtype", None)
    return out


def widened_drafter_config(cfg: dict[str, Any], plan: WideningPlan, dtype: torch.dtype) -> dict[str, Any]:
    out = dict(cfg)
    out.update(hidden_size=plan.hidden, intermediate_size=plan.inter, num_hidden_layers=plan.drafter_layers,
               num_attention_heads=plan.q_heads, num_key_value_heads=plan.kv_heads, head_dim=plan.head_dim,
               layer_types=["full_attention"] * plan.drafter_layers, max_window_layers=plan.drafter_layers,
               num_target_layers=plan.layers, dtype=str(dtype).replace("torch.", ""))
    if "target_hidden_size" in out:
        out["target_hidden_size"] = plan.hidden
    out["dflash_config"] = dict(cfg["dflash_config"], target_layer_ids=list(plan.target_layer_ids))
    out.pop("torch_dtype", None)
    return out


# --------------------------------------------------------------------------------------
# Writing (streamed, sharded) and building
# --------------------------------------------------------------------------------------

def _load_safetensors(d: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    sd: dict[str, torch.Tensor] = {}
    for fn in files:
        sd.update(load_file(os.path.join(d, fn)))
    return sd


def _write_sharded(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: str,
                   on_tensor: Callable[[str, int], None] | None = None) -> tuple[int, int]:
    """Write tensors as safetensors shards of <= MAX_SHARD_BYTES (one file ``model.safetensors``
    when it fits, else ``model-0000i-of-0000N.safetensors`` + index). Returns (params, bytes)."""
    from safetensors.torch import save_file

    shards: list[tuple[str, list[str]]] = []
    cur: dict[str, torch.Tensor] = {}
    cur_bytes = total_bytes = params = 0

    def flush():
        nonlocal cur, cur_bytes
        if cur:
            tmp = f"shard-{len(shards):05d}.tmp"
            save_file(cur, os.path.join(out_dir, tmp), metadata={"format": "pt"})
            shards.append((tmp, list(cur)))
            cur, cur_bytes = {}, 0

    for name, t in tensors:
        nb = t.numel() * t.element_size()
        if cur and cur_bytes + nb > MAX_SHARD_BYTES:
            flush()
        cur[name] = t.contiguous()
        cur_bytes += nb
        total_bytes += nb
        params += t.numel()
        if on_tensor:
            on_tensor(name, nb)
    flush()
    for tmp, _ in shards:          # safetensors writes 0600 files; a cache is meant to be shared
        os.chmod(os.path.join(out_dir, tmp), 0o644)
    if len(shards) == 1:
        os.replace(os.path.join(out_dir, shards[0][0]), os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for i, (tmp, names) in enumerate(shards):
            fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            os.replace(os.path.join(out_dir, tmp), os.path.join(out_dir, fn))
            weight_map.update({n: fn for n in names})
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, f, indent=2)
    return params, total_bytes


def _sha256_weights(d: str) -> str:
    h = hashlib.sha256()
    for fn in sorted(os.listdir(d)):
        if fn.endswith(".safetensors"):
            with open(os.path.join(d, fn), "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()


def _read_json(p: str) -> dict[str, Any]:
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def count_params(cfg: dict[str, Any], drafter: bool = False) -> int:
    """Parameters of a Qwen3 target (or a DFlash drafter without embed/lm_head) from its config."""
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or H // cfg["num_attention_heads"]
    nq, nkv, L, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["num_hidden_layers"], cfg["vocab_size"]
    layer = H * hd * (2 * nq + 2 * nkv) + 3 * H * I + 2 * H + 2 * hd
    if drafter:
        nf = len(cfg["dflash_config"]["target_layer_ids"])
        return L * layer + nf * H * H + 2 * H
    return L * layer + H + V * H * (1 if cfg.get("tie_word_embeddings") else 2)


class _Progress:
    """Build progress: a tqdm bar over bytes written when stderr is a terminal, else a log line
    every 10%; nothing when disabled."""

    def __init__(self, total: int, label: str, log: Log, enabled: bool):
        self.total, self.label, self.log, self.done, self.next_pct = total, label, log, 0, 10
        self.enabled, self.bar = enabled, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr)
            except ImportError:
                pass

    def __call__(self, name: str, nbytes: int) -> None:
        self.done += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)
        elif self.enabled:
            pct = 100 * self.done / max(self.total, 1)
            while pct >= self.next_pct and self.next_pct <= 100:
                self.log(f"{self.label}: {self.next_pct}% ({self.done / 1e6:.0f} / {self.total / 1e6:.0f} MB)")
                self.next_pct += 10

    def close(self):
        if self.bar is not None:
            self.bar.close()


def build_scaled_pair(shape: PairShape | str, out_dir: str, *, src_target: str | None = None,
                      src_drafter: str | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                      log: Log = _print, progress: bool = True) -> tuple[str, str]:
    """Widen the (src_target, src_drafter) pair (default: the shipped pair) to ``shape`` and write
    out_dir/{target,drafter}. out_dir must not exist yet (use :func:`ensure_scaled_pair` for the
    cached, atomic version). Returns (target_dir, drafter_dir)."""
    if isinstance(shape, str):
        shape = SHAPES[shape]
    if src_target is None or src_drafter is None:
        from vllm_bastion.tools.training import default_pair_paths

        dt, dd = default_pair_paths()
        src_target, src_drafter = src_target or dt, src_drafter or dd
    t0 = time.time()
    tcfg = _read_json(os.path.join(src_target, "config.json"))
    dcfg = _read_json(os.path.join(src_drafter, "config.json"))
    plan = plan_widening(tcfg, dcfg, shape)
    new_t, new_d = widened_target_config(tcfg, plan, dtype), widened_drafter_config(dcfg, plan, dtype)
    tdir, ddir = os.path.join(out_dir, "target"), os.path.join(out_dir, "drafter")
    os.makedirs(tdir)
    os.makedirs(ddir)
    esize = torch.empty(0, dtype=dtype).element_size()
    n_t, n_d = count_params(new_t), count_params(new_d, drafter=True)
    log(f"[scale_pair] {shape.name}: target {n_t / 1e6:.1f}M params ({plan.layers} layers, hidden {plan.hidden}, "
        f"{plan.q_heads}q/{plan.kv_heads}kv x {plan.head_dim}, FFN {plan.inter}), drafter {n_d / 1e6:.1f}M "
        f"({plan.drafter_layers} layers); {(n_t + n_d) * esize / 1e9:.2f} GB -> {out_dir}")
    bar = _Progress((n_t + n_d) * esize, f"scaled-{shape.name}", log, progress)
    try:
        src = _load_safetensors(src_target)
        pt, bt = _write_sharded(widen_target(src, plan, dtype=dtype, seed=seed), tdir, bar)
        del src
        src = _load_safetensors(src_drafter)
        pd, bd = _write_sharded(widen_drafter(src, plan, dtype=dtype, seed=seed), ddir, bar)
        del src
    finally:
        bar.close()
    assert (pt, pd) == (n_t, n_d), ((pt, pd), (n_t, n_d))
    for fn in TARGET_EXTRA_FILES:
        p = os.path.join(src_target, fn)
        if os.path.isfile(p):
            shutil.copyfile(p, os.path.join(tdir, fn))
    with open(os.path.join(tdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(new_t, f, indent=2)
    with open(os.path.join(ddir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(new_d, f, indent=2)
    meta = {
        "format_version": FORMAT_VERSION, "shape": asdict(shape), "dtype": str(dtype).replace("torch.", ""),
        "seed": seed, "plan": asdict(plan),
        "source": {"target": os.path.abspath(src_target), "drafter": os.path.abspath(src_drafter),
                   "target_sha256": _sha256_weights(src_target), "drafter_sha256": _sha256_weights(src_drafter)},
        "params": {"target": pt, "drafter": pd}, "bytes": {"target": bt, "drafter": bd},
        "build_seconds": round(time.time() - t0, 1),
    }
    for d in (tdir, ddir):
        with open(os.path.join(d, SCALED_META_FILE), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
    log(f"[scale_pair] {shape.name}: built in {meta['build_seconds']:.1f}s "
        f"(target {bt / 1e6:.0f} MB, drafter {bd / 1e6:.0f} MB)")
    return tdir, ddir


# --------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------

def cache_root() -> str:
    """``$XDG_CACHE_HOME/vllm_bastion/pairs`` (default ``~/.cache/vllm_bastion/pairs``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vllm_bastion", "pairs")


def scaled_pair_dir(shape: str, root: str | None = None) -> str:
    return os.path.join(root or cache_root(), f"scaled-{shape}")


def _cached_ok(d: str, shape: PairShape, src_target: str, src_drafter: str, dtype: torch.dtype,
               seed: int) -> bool:
    try:
        metas = [_read_json(os.path.join(d, s, SCALED_META_FILE)) for s in ("target", "drafter")]
    except (OSError, ValueError):
        return False
    m = metas[0]
    return (metas[0] == metas[1] and m.get("format_version") == FORMAT_VERSION and m.get("shape") == asdict(shape)
            and m.get("dtype") == str(dtype).replace("torch.", "") and m.get("seed") == seed
            and m["source"]["target_sha256"] == _sha256_weights(src_target)
            and m["source"]["drafter_sha256"] == _sha256_weights(src_drafter))


def ensure_scaled_pair(shape: str | PairShape = "0.6b", *, root: str | None = None, src_target: str | None = None,
                       src_drafter: str | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                       log: Log = _print, progress: bool = True) -> tuple[str, str]:
    """(target_dir, drafter_dir) of the widened pair ``scaled-<shape>``, built on first use.

    The pair lives in ``<root>/scaled-<shape>/{target,drafter}`` (root: :func:`cache_root`). It is
    rebuilt when missing, or when the source pair (default: the shipped one), dtype, seed or the
    widening's FORMAT_VERSION changed. The build goes to a temporary folder next to it and is
    renamed into place, so a crash never leaves a half-written pair, and concurrent builders
    leave one complete copy. ``progress``: a tqdm bar while building when stderr is a terminal,
    else a ``log`` line every 10%. ``shape``: a name in :data:`SHAPES` or a :class:`PairShape`
    (cached as ``scaled-<shape.name>``)."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise ValueError(f"unknown shape {shape!r}; known: {sorted(SHAPES)}")
        shape = SHAPES[shape]
    if src_target is None or src_drafter is None:
        from vllm_bastion.tools.training import default_pair_paths

        dt, dd = default_pair_paths()
        src_target, src_drafter = src_target or dt, src_drafter or dd
    final = scaled_pair_dir(shape.name, root)
    paths = os.path.join(final, "target"), os.path.join(final, "drafter")
    if _cached_ok(final, shape, src_target, src_drafter, dtype, seed):
        return paths
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".scaled-{shape.name}.tmp-{os.getpid()}-{int(time.time() * 1e3)}")
    log(f"[scale_pair] building scaled-{shape.name} (first use) ...")
    try:
        build_scaled_pair(shape, tmp, src_target=src_target, src_drafter=src_drafter, dtype=dtype,
                          seed=seed, log=log, progress=progress)
        if os.path.exists(final):            # stale (source or format changed): move it aside
            old = tmp + ".old"
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:                      # another process renamed its build in first
            if not _cached_ok(final, shape, src_target, src_drafter, dtype, seed):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


# --------------------------------------------------------------------------------------
# fp32 comparisons (transformers for the target, tools.training.DFlashDrafter for the drafter)
# --------------------------------------------------------------------------------------

def _load_hf_target(d: str):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="sdpa")
    m.eval()
    return m


@torch.no_grad()
def compare_targets(src_dir: str, wide_dir: str, tokens: torch.Tensor) -> dict[str, Any]:
    """fp32 logits of both targets on ``tokens`` [b, S]: max |diff|, max |logit|, top-1 agreement."""
    a = _load_hf_target(src_dir)(input_ids=tokens).logits
    b = _load_hf_target(wide_dir)(input_ids=tokens).logits
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "positions": int(tokens.numel())}


@torch.no_grad()
def drafter_block_logits(target, drafter_dir: str, tokens: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """fp32 DFlash drafter logits [b, N*B, V] for blocks [anchor, MASK...] at ``anchors`` [b, N],
    with context features from ``target`` (an HF Qwen3ForCausalLM) at the drafter's
    target_layer_ids, through :class:`vllm_bastion.tools.training.DFlashDrafter`."""
    from vllm_bastion.tools import training as T

    drafter, cfg = T.load_drafter(drafter_dir, torch.float32)
    drafter.eval()
    ids = cfg["dflash_config"]["target_layer_ids"]
    feats = T._target_features(target, tokens, ids, autocast=False)
    B, mask_id = cfg["block_size"], cfg["dflash_config"]["mask_token_id"]
    bids, pos, _labels, _depth = T.build_blocks(tokens, anchors, B, mask_id)
    b, S = tokens.shape
    ctx = drafter.fuse(feats)
    h = drafter(target.model.embed_tokens(bids), pos, ctx, torch.arange(S).expand(b, S),
                T.dflash_attention_mask(anchors, S, B))
    return target.lm_head(h)


@torch.no_grad()
def compare_drafters(src_target: str, src_drafter: str, wide_target: str, wide_drafter: str,
                     tokens: torch.Tensor, anchors: torch.Tensor) -> dict[str, Any]:
    a = drafter_block_logits(_load_hf_target(src_target), src_drafter, tokens, anchors)
    b = drafter_block_logits(_load_hf_target(wide_target), wide_drafter, tokens, anchors)
    return {"max_abs_diff": (a - b).abs().max().item(), "max_abs_logit": a.abs().max().item(),
            "top1_agree": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
            "positions": int(a.shape[0] * a.shape[1])}
