"""What one verify forward of a dense decoder costs, before any calibration. Pure numpy.

Request i of a step feeds s_i new tokens (its tree root plus its draft nodes)
on top of c_i tokens already in the KV cache. From an HF config's shape:

    F(batch) = f_tok * sum_i s_i + 4 * h_q * L * sum_i s_i (c_i + s_i)
    M(batch) = W_bytes + sum_i [ m_tok * s_i + KV_read(c_i) + scores(s_i, c_i) ]

with f_tok the per-token FLOPs of the projections, MLP and LM head, W_bytes
the weights read once per step, m_tok per-token bytes (embedding row, KV write,
activation I/O, logits) and KV_read(c) = 2 c h_kv L bytes_kv. Tree attention
is costed like causal attention of s_i queries over c_i + s_i keys. The
attention-score matrix n_q * s_i * (c_i + s_i) is counted as materialized
(written by QK^T, read by PV) only when `materialized_scores=True`, as in the
BASTION reference (HF SDPA with a dense mask). The default is False: vLLM's
attention backends (FlashAttention / FlashInfer / tree kernels) never write it,
and counting it makes long-context trees look far more memory-bound than they
are (e.g. Qwen3-8B, c = 32k, 64-node tree: ~10 GB of phantom traffic per
request, against ~4.8 GB of real KV reads).

Contents: `ModelShape` (dense decoder shape from an HF config dict),
`per_token_costs`, `verify_flops`, `verify_bytes`, `normalize_dtype`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


class UnsupportedModelError(ValueError):
    """The HF config is not a dense decoder-only transformer we can cost."""


# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------

_DTYPE_ALIASES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "float32": "fp32",
    "fp32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
    "tf32": "tf32",
    "fp8": "fp8",
    "float8": "fp8",
    "float8_e4m3fn": "fp8",
    "float8_e4m3fnuz": "fp8",
    "float8_e5m2": "fp8",
    "fp8_e4m3": "fp8",
    "fp8_e5m2": "fp8",
}

_DTYPE_BYTES = {"bf16": 2.0, "fp16": 2.0, "fp32": 4.0, "tf32": 4.0, "fp8": 1.0}


def normalize_dtype(dtype: Any) -> str:
    """'bfloat16' / torch.bfloat16 / 'bf16' -> 'bf16' (also fp16, fp32, fp8)."""
    key = str(dtype).strip().lower()
    if key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    if key.startswith("torch."):
        key = key[len("torch.") :]
        if key in _DTYPE_ALIASES:
            return _DTYPE_ALIASES[key]
    if "float8" in key or key.startswith("fp8"):
        return "fp8"
    raise ValueError(
        f"unknown dtype {dtype!r}; expected one of bfloat16, float16, float32, fp8"
    )


# --------------------------------------------------------------------------
# model shape
# --------------------------------------------------------------------------

_MOE_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


@dataclass(frozen=True)
class ModelShape:
    """Shape of a dense decoder-only transformer (Llama/Qwen2/Qwen3/Mistral style)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    bytes_per_param: float = 2.0
    kv_bytes_per_elem: float = 2.0
    act_bytes_per_elem: float = 2.0
    tie_word_embeddings: bool = False
    dtype: str = "bf16"

    def __post_init__(self) -> None:
        for name in (
            "num_layers",
            "hidden_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {v!r}")
        for name in ("bytes_per_param", "kv_bytes_per_elem", "act_bytes_per_elem"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"ModelShape.{name} must be a positive number, got {v!r}")

    # derived sizes
    @property
    def h_q(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def h_kv(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        """Parameters (matrices only; norms and biases are negligible)."""
        h, L = self.hidden_size, self.num_layers
        per_layer = 2 * h * self.h_q + 2 * h * self.h_kv + 3 * h * self.intermediate_size
        emb = self.vocab_size * h
        return L * per_layer + emb * (1 if self.tie_word_embeddings else 2)

    def weight_bytes_per_step(self) -> float:
        """Weights streamed once per forward: all layers plus the LM head.

        The input embedding is a gather of the step's rows (counted per token in
        `per_token_costs`), not a read of the whole table; the BASTION
        reference counts the table too (V*h extra bytes), which calibration
        absorbs into b_m.
        """
        h, L = self.hidden_size, self.num_layers
        per_layer = 2 * h * self.h_q + 2 * h * self.h_kv + 3 * h * self.intermediate_size
        return self.bytes_per_param * (L * per_layer + h * self.vocab_size)

    def kv_bytes_per_context_token(self) -> float:
        return self.kv_bytes_per_elem * 2 * self.h_kv * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def fingerprint(self) -> str:
        """Short stable hash of the shape (for profile keys)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha1(blob).hexdigest()[:16]

    @classmethod
    def from_hf_config(
        cls,
        cfg: dict[str, Any],
        *,
        dtype: Any | None = None,
        kv_cache_dtype: Any | None = None,
        bytes_per_param: float | None = None,
    ) -> ModelShape:
        """Build from an HF `config.json` dict of a dense decoder.

        Args:
            cfg: the config dict. A multimodal wrapper's `text_config` is used
                when the top level has no `num_hidden_layers`.
            dtype: the dtype the engine runs the model in (overrides
                `torch_dtype`/`dtype` of the config; 'auto' = the config's).
                Missing everywhere: bf16.
            kv_cache_dtype: e.g. 'fp8' for an fp8 KV cache ('auto' = dtype).
            bytes_per_param: override for quantized weights (e.g. 1.0 for
                fp8, ~0.56 for 4-bit with scales).

        Raises:
            UnsupportedModelError for MoE configs or missing keys.
        """
        if not isinstance(cfg, dict):
            raise TypeError(f"expected a config dict, got {type(cfg).__name__}")
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), dict):
            outer_dtype = cfg.get("torch_dtype", cfg.get("dtype"))
            cfg = dict(cfg["text_config"])
            if outer_dtype is not None and "torch_dtype" not in cfg and "dtype" not in cfg:
                cfg["torch_dtype"] = outer_dtype

        moe = [k for k in _MOE_KEYS if _positive(cfg.get(k))]
        archs = [str(a) for a in (cfg.get("architectures") or [])]
        if any("moe" in a.lower() for a in archs) or moe:
            raise UnsupportedModelError(
                "Mixture-of-experts models are not supported by the dense roofline "
                f"cost model (config has {moe or archs}); only dense decoders "
                "(Llama / Qwen2 / Qwen3 / Mistral style) can be costed."
            )

        required = (
            "num_hidden_layers",
            "hidden_size",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        missing = [k for k in required if cfg.get(k) is None]
        if missing:
            raise UnsupportedModelError(
                f"config is missing {missing}; the cost model needs {list(required)} "
                "(plus optional num_key_value_heads, head_dim, torch_dtype, "
                "tie_word_embeddings)"
            )
        L = int(cfg["num_hidden_layers"])
        h = int(cfg["hidden_size"])
        n_q = int(cfg["num_attention_heads"])
        n_kv = cfg.get("num_key_value_heads")
        n_kv = n_q if n_kv is None else int(n_kv)
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if h % n_q:
                raise UnsupportedModelError(
                    f"hidden_size {h} is not divisible by num_attention_heads {n_q} "
                    "and the config gives no head_dim"
                )
            head_dim = h // n_q
        ffn = cfg["intermediate_size"]
        if isinstance(ffn, (list, tuple)):
            raise UnsupportedModelError("per-layer intermediate sizes are not supported")

        cfg_dtype = cfg.get("torch_dtype", cfg.get("dtype"))
        if dtype is None or str(dtype).lower() == "auto":
            dtype = cfg_dtype if cfg_dtype is not None else "bfloat16"
        dt = normalize_dtype(dtype)
        if dt == "tf32":
            dt = "fp32"
        bp = float(bytes_per_param) if bytes_per_param is not None else _DTYPE_BYTES[dt]
        act_bytes = _DTYPE_BYTES["bf16"] if dt == "fp8" else _DTYPE_BYTES[dt]
        if kv_cache_dtype is None or str(kv_cache_dtype).lower() == "auto":
            kv_bytes = act_bytes
        else:
            kv_bytes = _DTYPE_BYTES[normalize_dtype(kv_cache_dtype)]
        return cls(
            num_layers=L,
            hidden_size=h,
            num_heads=n_q,
            num_kv_heads=n_kv,
            head_dim=int(head_dim),
            intermediate_size=int(ffn),
            vocab_size=int(cfg["vocab_size"]),
            bytes_per_param=bp,
            kv_bytes_per_elem=kv_bytes,
            act_bytes_per_elem=act_bytes,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=dt,
        )


def _positive(v: Any) -> bool:
    try:
        return v is not None and float(v) > 0
    except (TypeError, ValueError):
        return bool(v)


# --------------------------------------------------------------------------
# FLOPs and bytes of one verify forward
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PerTokenCosts:
    """Decomposition used by the vectorized budget search.

    F(batch) = flops_per_token * sum s_i + flops_attn * sum s_i (c_i + s_i)
    M(batch) = bytes_fixed + bytes_per_token * sum s_i
               + bytes_per_ctx * sum c_i + bytes_attn * sum s_i (c_i + s_i)
    """

    flops_per_token: float
    flops_attn: float
    bytes_fixed: float
    bytes_per_token: float
    bytes_per_ctx: float
    bytes_attn: float


def per_token_costs(shape: ModelShape, materialized_scores: bool = False) -> PerTokenCosts:
    L, h, hq, hkv = shape.num_layers, shape.hidden_size, shape.h_q, shape.h_kv
    ffn, V, nq = shape.intermediate_size, shape.vocab_size, shape.num_heads
    # QKV proj, O proj, gate/up/down (per layer) + LM head
    f_tok = L * (2 * h * hq + 4 * h * hkv + 2 * hq * h + 6 * h * ffn) + 2 * h * V
    f_attn = 4 * hq * L  # QK^T and PV over c + s keys
    ab = shape.act_bytes_per_elem
    # activation I/O per token and layer (papers.md A_attn and A_ffn, linear part):
    # (h + hq + 2hkv) + hq + hq + (hq + h)  and  (h + 2 ffn) + (2 ffn + h)
    act_layer = (2 * h + 4 * hq + 2 * hkv) + (2 * h + 4 * ffn)
    m_tok = (
        ab * (L * act_layer + h + V)  # layer activations, hidden in, logits out
        + shape.bytes_per_param * h  # embedding row gather
        + shape.kv_bytes_per_elem * 2 * hkv * L  # KV write
    )
    return PerTokenCosts(
        flops_per_token=float(f_tok),
        flops_attn=float(f_attn),
        bytes_fixed=float(shape.weight_bytes_per_step()),
        bytes_per_token=float(m_tok),
        bytes_per_ctx=float(shape.kv_bytes_per_context_token()),
        # score matrix n_q * s (c + s) written by QK^T and read by PV
        bytes_attn=float(ab * L * 2 * nq) if materialized_scores else 0.0,
    )


def _as_arrays(new_tokens: Any, contexts: Any) -> tuple[np.ndarray, np.ndarray]:
    s = np.atleast_1d(np.asarray(_to_numpy(new_tokens), dtype=np.float64))
    c = np.atleast_1d(np.asarray(_to_numpy(contexts), dtype=np.float64))
    if s.shape != c.shape:
        s, c = np.broadcast_arrays(s, c)
    if np.any(s < 0) or np.any(c < 0):
        raise ValueError("new_tokens and contexts must be >= 0")
    return s, c


def _to_numpy(x: Any) -> Any:
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        return x.detach().cpu().numpy()
    return x


def verify_flops(shape: ModelShape, new_tokens: Any, contexts: Any) -> float:
    """FLOPs of one verify forward of a batch: request i feeds new_tokens[i]
    tokens on top of contexts[i] cached tokens."""
    s, c = _as_arrays(new_tokens, contexts)
    k = per_token_costs(shape)
    return float(k.flops_per_token * s.sum() + k.flops_attn * np.sum(s * (c + s)))


def verify_bytes(
    shape: ModelShape, new_tokens: Any, contexts: Any, materialized_scores: bool = False
) -> float:
    """Bytes moved by one verify forward of a batch (weights once per step,
    KV read per request, KV write and activation I/O per token)."""
    s, c = _as_arrays(new_tokens, contexts)
    k = per_token_costs(shape, materialized_scores)
    return float(
        k.bytes_fixed
        + k.bytes_per_token * s.sum()
        + k.bytes_per_ctx * c.sum()
        + k.bytes_attn * np.sum(s * (c + s))
    )
