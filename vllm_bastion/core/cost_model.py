"""Calibrated roofline latency model for one batched verify forward.

Pure numpy (torch only where `budget.py` asks for tensors); imports nothing
from vLLM. scipy is not needed.

What is modelled (BASTION's estimator, see papers.md section 1.2, extended
from one request to a whole engine step): the target forward that verifies a
batch of draft trees. Request i of the step feeds s_i new tokens (its tree
root plus its draft nodes, s_i = 1 + n_i) on top of c_i tokens already in the
KV cache. Then

    F(batch) = f_tok * sum_i s_i + 4 * h_q * L * sum_i s_i (c_i + s_i)
    M(batch) = W_bytes + sum_i [ m_tok * s_i + KV_read(c_i) + scores(s_i, c_i) ]
    C(batch) = max(a_c * F / peak_flops + b_c,  a_m * M / bandwidth + b_m)   seconds

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

A round of speculative decoding costs T_fix + C(batch), where T_fix is the
drafter forward plus the tree build / bookkeeping overhead (measured, not
modelled).

Contents:
  * `ModelShape`          dense decoder shape from an HF config dict
  * `verify_flops`, `verify_bytes`, `per_token_costs`
  * `DevicePrior`, `load_device_prior`, `load_device_priors`
  * `RooflineCoeffs`, `LatencyModel`
  * `fit_latency_model` -> `FitResult` (offline calibration, numpy only)
  * `OnlineRefit` (RLS with forgetting + Huber clipping), `RobustEma`
  * `save_profile`, `load_profile` (JSON, keyed by a caller-provided dict)
  * `probe_plan` (a calibration grid of batch shapes)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "UnsupportedModelError",
    "ModelShape",
    "PerTokenCosts",
    "per_token_costs",
    "verify_flops",
    "verify_bytes",
    "DevicePrior",
    "default_roofline_dir",
    "load_device_priors",
    "load_device_prior",
    "normalize_dtype",
    "RooflineCoeffs",
    "LatencyModel",
    "CalibrationSample",
    "FitResult",
    "fit_latency_model",
    "format_fit_table",
    "OnlineRefit",
    "RobustEma",
    "profile_to_dict",
    "profile_from_dict",
    "save_profile",
    "load_profile",
    "probe_plan",
]


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


# --------------------------------------------------------------------------
# device priors
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePrior:
    """Datasheet roofline of one device (dense peaks, no sparsity)."""

    name: str
    match: tuple[str, ...]
    peak_flops: dict[str, float]  # normalized dtype ('bf16', 'fp16', 'fp32', 'tf32', 'fp8') -> FLOP/s
    memory_bandwidth: float  # bytes/s
    source: str = ""
    fallback: bool = False
    notes: str = ""

    def peak_flops_for(self, dtype: Any) -> float:
        """Dense peak for a model dtype. fp8 falls back to bf16 where the device
        has no fp8 tensor cores (weights are upcast); fp32 falls back to tf32."""
        dt = normalize_dtype(dtype)
        order = {
            "bf16": ["bf16", "fp16"],
            "fp16": ["fp16", "bf16"],
            "fp8": ["fp8", "bf16", "fp16"],
            "fp32": ["fp32", "tf32"],
            "tf32": ["tf32", "fp32"],
        }[dt]
        for k in order:
            v = self.peak_flops.get(k)
            if v:
                return float(v)
        raise KeyError(f"device prior {self.name!r} has no peak FLOP/s for {dt}")

    def aggregate(self, num_devices: int) -> DevicePrior:
        """The roofline of `num_devices` such devices working as one (tensor
        parallelism): peaks and bandwidth add up; all-reduce time is left to
        the calibrated intercepts. Calibrate a TP>1 engine against this, not
        against the single-device prior (the slope floor assumes the prior is
        the hardware that runs the model)."""
        k = int(num_devices)
        if k < 1:
            raise ValueError("num_devices must be >= 1")
        if k == 1:
            return self
        return DevicePrior(
            name=f"{k}x {self.name}",
            match=(),
            peak_flops={d: v * k for d, v in self.peak_flops.items()},
            memory_bandwidth=self.memory_bandwidth * k,
            source=self.source,
            fallback=self.fallback,
            notes=self.notes,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["match"] = list(self.match)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePrior:
        for k in ("name", "peak_flops", "memory_bandwidth"):
            if k not in d:
                raise ValueError(f"device prior is missing {k!r}: {d}")
        peaks = {normalize_dtype(k): float(v) for k, v in d["peak_flops"].items() if v}
        bw = float(d["memory_bandwidth"])
        if bw <= 0 or not peaks or any(v <= 0 for v in peaks.values()):
            raise ValueError(f"device prior {d['name']!r} needs positive peaks and bandwidth")
        return cls(
            name=str(d["name"]),
            match=tuple(str(m) for m in d.get("match", [])),
            peak_flops=peaks,
            memory_bandwidth=bw,
            source=str(d.get("source", "")),
            fallback=bool(d.get("fallback", False)),
            notes=str(d.get("notes", "")),
        )


# used if the configs directory cannot be found (e.g. a non-editable install)
_BUILTIN_CPU_PRIOR = {
    "name": "Generic CPU",
    "match": ["cpu"],
    "peak_flops": {"fp32": 2.0e11, "bf16": 2.0e11, "fp16": 1.0e11},
    "memory_bandwidth": 2.5e10,
    "source": "conservative built-in default; overwrite by calibration",
    "fallback": True,
}


def default_roofline_dir() -> Path:
    """The shipped priors: configs/roofline, installed as vllm_bastion.configs."""
    try:
        from importlib.resources import files

        return Path(str(files("vllm_bastion.configs") / "roofline"))
    except (ImportError, ModuleNotFoundError, TypeError):
        return Path(__file__).resolve().parents[2] / "configs" / "roofline"


def load_device_priors(configs_dir: str | os.PathLike | None = None) -> list[DevicePrior]:
    d = Path(configs_dir) if configs_dir is not None else default_roofline_dir()
    priors = []
    if d.is_dir():
        for p in sorted(d.glob("*.json")):
            with open(p, encoding="utf-8") as f:
                priors.append(DevicePrior.from_dict(json.load(f)))
    return priors


def _norm_name(s: str) -> str:
    return " " + " ".join(re.findall(r"[a-z0-9]+", s.lower())) + " "


def load_device_prior(
    device_name: str, configs_dir: str | os.PathLike | None = None
) -> DevicePrior:
    """Best prior for a device name (e.g. torch.cuda.get_device_name()).

    Matching is case-insensitive on whole words after dropping punctuation
    ('NVIDIA A100-SXM4-80GB' matches 'A100 SXM4 80GB'); the longest matching
    string wins. Unknown devices get the entry marked `fallback` (the generic
    CPU entry) -- its numbers are placeholders, calibrate before trusting them.
    """
    priors = load_device_priors(configs_dir)
    name = _norm_name(device_name or "")
    best, best_len = None, -1
    for p in priors:
        for m in p.match:
            nm = _norm_name(m)
            if nm.strip() and nm in name and len(nm) > best_len:
                best, best_len = p, len(nm)
    if best is not None:
        return best
    for p in priors:
        if p.fallback:
            return p
    return DevicePrior.from_dict(_BUILTIN_CPU_PRIOR)


# --------------------------------------------------------------------------
# latency model
# --------------------------------------------------------------------------


@dataclass
class RooflineCoeffs:
    """C = max(a_c * F/peak + b_c, a_m * M/bw + b_m); all >= 0 (b in seconds)."""

    a_c: float = 1.0
    b_c: float = 0.0
    a_m: float = 1.0
    b_m: float = 0.0

    def __post_init__(self) -> None:
        for k in ("a_c", "b_c", "a_m", "b_m"):
            v = float(getattr(self, k))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"RooflineCoeffs.{k} must be finite and >= 0, got {v}")
            setattr(self, k, v)

    def as_array(self) -> np.ndarray:
        return np.array([self.a_c, self.b_c, self.a_m, self.b_m], dtype=np.float64)

    @classmethod
    def from_array(cls, x: Sequence[float]) -> RooflineCoeffs:
        return cls(*[max(0.0, float(v)) for v in x])


class LatencyModel:
    """Calibrated roofline for one (device, model, dtype).

    `step_time` is the verify forward C(batch) in seconds; `t_fix` (seconds per
    step) is the drafter forward plus tree overhead, `fixed_time(B)` =
    t_fix + t_fix_per_request * B.
    """

    def __init__(
        self,
        shape: ModelShape,
        peak_flops: float,
        bandwidth: float,
        coeffs: RooflineCoeffs | None = None,
        *,
        t_fix: float = 0.0,
        t_fix_per_request: float = 0.0,
        materialized_scores: bool = False,
        device_name: str = "",
    ) -> None:
        if not (peak_flops > 0 and bandwidth > 0):
            raise ValueError("peak_flops and bandwidth must be > 0")
        self.shape = shape
        self.peak_flops = float(peak_flops)
        self.bandwidth = float(bandwidth)
        self.coeffs = coeffs if coeffs is not None else RooflineCoeffs()
        self.t_fix = float(t_fix)
        self.t_fix_per_request = float(t_fix_per_request)
        self.materialized_scores = bool(materialized_scores)
        self.device_name = device_name
        self.costs = per_token_costs(shape, materialized_scores)

    @classmethod
    def from_prior(
        cls,
        shape: ModelShape,
        prior: DevicePrior,
        coeffs: RooflineCoeffs | None = None,
        **kw: Any,
    ) -> LatencyModel:
        return cls(
            shape,
            prior.peak_flops_for(shape.dtype),
            prior.memory_bandwidth,
            coeffs,
            device_name=prior.name,
            **kw,
        )

    def with_coeffs(self, coeffs: RooflineCoeffs) -> LatencyModel:
        m = self.copy()
        m.coeffs = RooflineCoeffs(**asdict(coeffs))
        return m

    def copy(self) -> LatencyModel:
        return LatencyModel(
            self.shape,
            self.peak_flops,
            self.bandwidth,
            RooflineCoeffs(**asdict(self.coeffs)),
            t_fix=self.t_fix,
            t_fix_per_request=self.t_fix_per_request,
            materialized_scores=self.materialized_scores,
            device_name=self.device_name,
        )

    # raw roofline -------------------------------------------------------
    def raw_times(self, new_tokens: Any, contexts: Any) -> tuple[float, float]:
        """(F/peak, M/bw) in seconds, uncalibrated."""
        s, c = _as_arrays(new_tokens, contexts)
        return self._raw(s, c)

    def _raw(self, s: np.ndarray, c: np.ndarray) -> tuple[float, float]:
        k = self.costs
        ssum = float(s.sum())
        quad = float(np.sum(s * (c + s)))
        F = k.flops_per_token * ssum + k.flops_attn * quad
        M = k.bytes_fixed + k.bytes_per_token * ssum + k.bytes_per_ctx * float(c.sum()) + k.bytes_attn * quad
        return F / self.peak_flops, M / self.bandwidth

    # calibrated ---------------------------------------------------------
    def _combine(self, tc: float, tm: float) -> float:
        k = self.coeffs
        return max(k.a_c * tc + k.b_c, k.a_m * tm + k.b_m)

    def step_time(self, new_tokens: Any, contexts: Any) -> float:
        """C(batch): seconds of the verify forward (request i: new_tokens[i]
        tokens = 1 + tree nodes, over contexts[i] cached tokens)."""
        return self._combine(*self.raw_times(new_tokens, contexts))

    def branch(self, new_tokens: Any, contexts: Any) -> str:
        """'compute' or 'memory': which roofline branch is active."""
        tc, tm = self.raw_times(new_tokens, contexts)
        k = self.coeffs
        return "compute" if k.a_c * tc + k.b_c >= k.a_m * tm + k.b_m else "memory"

    def fixed_time(self, batch_size: int) -> float:
        """T_fix for a step of `batch_size` requests (drafter + tree overhead)."""
        return self.t_fix + self.t_fix_per_request * batch_size

    def round_time(self, new_tokens: Any, contexts: Any) -> float:
        s, _ = _as_arrays(new_tokens, contexts)
        return self.fixed_time(len(s)) + self.step_time(new_tokens, contexts)

    def marginal_cost(
        self,
        new_tokens: Any,
        contexts: Any,
        request: int | None = None,
        extra: int | Sequence[int] = 1,
    ) -> float:
        """C(after) - C(before) when `extra` tree nodes are added to request
        `request` (or, with request=None, `extra` nodes to every request; a
        sequence gives per-request extras)."""
        s, c = _as_arrays(new_tokens, contexts)
        s2 = s.copy()
        if request is None:
            s2 = s2 + np.asarray(extra, dtype=np.float64)
        else:
            s2[request] += float(np.asarray(extra))
        return self._combine(*self._raw(s2, c)) - self._combine(*self._raw(s, c))

    # serialization --------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape.to_dict(),
            "peak_flops": self.peak_flops,
            "bandwidth": self.bandwidth,
            "coeffs": asdict(self.coeffs),
            "t_fix": self.t_fix,
            "t_fix_per_request": self.t_fix_per_request,
            "materialized_scores": self.materialized_scores,
            "device_name": self.device_name,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyModel:
        return cls(
            ModelShape.from_dict(d["shape"]),
            float(d["peak_flops"]),
            float(d["bandwidth"]),
            RooflineCoeffs(**d.get("coeffs", {})),
            t_fix=float(d.get("t_fix", 0.0)),
            t_fix_per_request=float(d.get("t_fix_per_request", 0.0)),
            materialized_scores=bool(d.get("materialized_scores", False)),
            device_name=str(d.get("device_name", "")),
        )

    def __repr__(self) -> str:
        k = self.coeffs
        return (
            f"LatencyModel({self.device_name or '?'}, peak={self.peak_flops:.3g} FLOP/s, "
            f"bw={self.bandwidth:.3g} B/s, a_c={k.a_c:.4g}, b_c={k.b_c:.4g}s, "
            f"a_m={k.a_m:.4g}, b_m={k.b_m:.4g}s, t_fix={self.t_fix:.4g}s)"
        )


# --------------------------------------------------------------------------
# offline calibration
# --------------------------------------------------------------------------


@dataclass
class CalibrationSample:
    """One timed verify forward: per-request (new_tokens, context) and seconds."""

    requests: list[tuple[int, int]]
    seconds: float


def _coerce_samples(samples: Iterable[Any]) -> list[CalibrationSample]:
    out = []
    for smp in samples:
        if isinstance(smp, CalibrationSample):
            out.append(smp)
            continue
        reqs, t = smp
        arr = np.asarray(_to_numpy(reqs), dtype=np.float64).reshape(-1, 2)
        out.append(CalibrationSample([(float(a), float(b)) for a, b in arr], float(t)))
    return out


@dataclass
class FitResult:
    model: LatencyModel
    measured: np.ndarray  # seconds
    predicted: np.ndarray  # seconds
    branch: np.ndarray  # per sample: True = compute branch active
    total_tokens: np.ndarray
    batch_sizes: np.ndarray
    mean_context: np.ndarray
    compute_identified: bool
    memory_identified: bool
    loss: float

    @property
    def coeffs(self) -> RooflineCoeffs:
        return self.model.coeffs

    @property
    def rel_errors(self) -> np.ndarray:
        return np.abs(self.predicted - self.measured) / self.measured

    @property
    def mape(self) -> float:
        return float(np.mean(self.rel_errors)) if len(self.measured) else 0.0

    @property
    def max_rel_error(self) -> float:
        return float(np.max(self.rel_errors)) if len(self.measured) else 0.0

    def table(self, max_rows: int | None = None) -> str:
        return format_fit_table(self, max_rows=max_rows)

    def summary(self) -> dict[str, Any]:
        return {
            "coeffs": asdict(self.coeffs),
            "mape": self.mape,
            "max_rel_error": self.max_rel_error,
            "num_samples": int(len(self.measured)),
            "num_compute_bound": int(self.branch.sum()),
            "compute_identified": self.compute_identified,
            "memory_identified": self.memory_identified,
        }


def format_fit_table(fit: FitResult, max_rows: int | None = None) -> str:
    """Predicted-vs-measured table (one line per sample, worst errors last if
    truncated to max_rows)."""
    idx = np.arange(len(fit.measured))
    if max_rows is not None and len(idx) > max_rows:
        idx = np.sort(np.argsort(fit.rel_errors)[-max_rows:])
    lines = [
        f"{'#':>4} {'reqs':>5} {'tokens':>7} {'mean_ctx':>9} {'measured_ms':>12} "
        f"{'predicted_ms':>13} {'rel_err':>8} branch"
    ]
    for i in idx:
        lines.append(
            f"{i:>4d} {int(fit.batch_sizes[i]):>5d} {int(fit.total_tokens[i]):>7d} "
            f"{fit.mean_context[i]:>9.0f} {fit.measured[i] * 1e3:>12.4f} "
            f"{fit.predicted[i] * 1e3:>13.4f} {fit.rel_errors[i] * 100:>7.2f}% "
            f"{'compute' if fit.branch[i] else 'memory'}"
        )
    lines.append(
        f"MAPE {fit.mape * 100:.2f}%  max rel err {fit.max_rel_error * 100:.2f}%  "
        f"({int(fit.branch.sum())}/{len(fit.branch)} compute-bound)"
    )
    return "\n".join(lines)


def _nnls2(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """min ||X theta - y||^2 s.t. theta >= 0 for two columns, exactly (KKT faces)."""
    cands = []
    sol, *_ = np.linalg.lstsq(X, y, rcond=None)
    if np.all(sol >= 0) and np.all(np.isfinite(sol)):
        cands.append(sol)
    for j in range(2):
        col = X[:, j]
        den = float(col @ col)
        th = np.zeros(2)
        if den > 0:
            th[j] = max(0.0, float(col @ y) / den)
        cands.append(th)
    cands.append(np.zeros(2))
    best = min(cands, key=lambda th: float(np.sum((X @ th - y) ** 2)))
    return best


def fit_latency_model(
    samples: Iterable[Any],
    shape: ModelShape,
    device_prior: DevicePrior,
    *,
    t_fix: float = 0.0,
    t_fix_per_request: float = 0.0,
    materialized_scores: bool = False,
    sigma_scale: float = 30.0,
    huber_delta: float = 0.05,
    ridge: float = 1e-6,
    max_iter: int = 60,
    min_slope: float | None = None,
    min_branch_points: int = 3,
) -> FitResult:
    """Fit C = max(a_c T_comp + b_c, a_m T_mem + b_m) (all >= 0) to timings.

    samples: iterable of (requests, seconds) (or `CalibrationSample`s), where
        requests lists (new_tokens s_i, context c_i) of every request of the
        timed forward; seconds is the measured verify forward.

    Method (numpy only): the model is max-affine in (T_comp, T_mem), so for a
    fixed assignment of samples to branches it is two independent linear
    least-squares problems. We alternate assignment <-> 2-variable exact NNLS
    per branch (which is Gauss-Newton for this piecewise-linear model),
    reweighting residuals with a Huber loss (IRLS) on *relative* error, from
    several starts (raw roofline split, all-memory, all-compute, splits at
    quantiles of arithmetic intensity) and keep the best. Per-sample sigma =
    1 + sigma_scale * (tokens - min) / (max - min), renormalized to mean 1, so
    small batches weigh more (BASTION weights small trees the same way).
    A tiny ridge pulls each slope to 1 and intercept to 0 for conditioning.
    Slopes are bounded below by `min_slope` (default 0.5 for a datasheet
    prior: no kernel runs at twice the peak; 0 for the placeholder/fallback
    prior), a two-branch fit needs `min_branch_points` samples on each
    branch and must beat the best single-branch fit by BIC;
    without both guards a max of two lines happily fits noise with a flat
    "compute" branch that then under-predicts large batches badly.

    A branch that no sample activates cannot be measured; it is then
    extrapolated with the other branch's efficiency (same slope and
    intercept), lowered until it stays below every measurement, and flagged
    (`compute_identified` / `memory_identified` False).
    """
    samples = _coerce_samples(samples)
    if not samples:
        raise ValueError("no calibration samples")
    base = LatencyModel.from_prior(
        shape,
        device_prior,
        t_fix=t_fix,
        t_fix_per_request=t_fix_per_request,
        materialized_scores=materialized_scores,
    )
    n = len(samples)
    xc = np.empty(n)
    xm = np.empty(n)
    y = np.empty(n)
    tok = np.empty(n)
    bs = np.empty(n)
    mc = np.empty(n)
    for i, smp in enumerate(samples):
        arr = np.asarray(smp.requests, dtype=np.float64).reshape(-1, 2)
        if not (math.isfinite(smp.seconds) and smp.seconds > 0):
            raise ValueError(f"sample {i} has non-positive or non-finite time {smp.seconds}")
        xc[i], xm[i] = base._raw(arr[:, 0], arr[:, 1])
        y[i] = smp.seconds
        tok[i] = arr[:, 0].sum()
        bs[i] = len(arr)
        mc[i] = arr[:, 1].mean() if len(arr) else 0.0

    span = tok.max() - tok.min()
    sigma = 1.0 + sigma_scale * (tok - tok.min()) / span if span > 0 else np.ones(n)
    sigma = sigma / sigma.mean()
    w = 1.0 / (y * sigma)  # relative, small batches weighted up
    t_scale = float(np.median(y))
    prior = np.array([1.0, 0.0])
    if min_slope is None:
        min_slope = 0.0 if device_prior.fallback else 0.5
    a_min = float(min_slope)

    def predict(th: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pc = th[0] * xc + th[1]
        pm = th[2] * xm + th[3]
        return np.maximum(pc, pm), pc >= pm

    def loss_of(th: np.ndarray) -> float:
        r = (predict(th)[0] - y) * w
        a = np.abs(r)
        return float(np.sum(np.where(a <= huber_delta, 0.5 * r * r, huber_delta * (a - 0.5 * huber_delta))))

    def fit_branch(x: np.ndarray, t: np.ndarray, ww: np.ndarray, prev: np.ndarray) -> np.ndarray:
        if len(x) == 0:
            return prev
        # columns scaled to O(1): theta' = (a, b / t_scale)
        X = np.stack([x * ww, np.full_like(x, t_scale) * ww], 1)
        yy = t * ww
        lam = math.sqrt(ridge * max(len(x), 1))
        X = np.vstack([X, lam * np.eye(2)])
        yy = np.concatenate([yy, lam * prior])
        # a = a_min + a', a' >= 0
        th = _nnls2(X, yy - a_min * X[:, 0])
        return np.array([th[0] + a_min, th[1] * t_scale])

    def alternate(assign: np.ndarray, th: np.ndarray) -> tuple[np.ndarray, float]:
        hub = np.ones(n)
        for _ in range(max_iter):
            ww = w * np.sqrt(hub)
            thc = fit_branch(xc[assign], y[assign], ww[assign], th[:2])
            thm = fit_branch(xm[~assign], y[~assign], ww[~assign], th[2:])
            th = np.concatenate([thc, thm])
            pred, new_assign = predict(th)
            r = np.abs((pred - y) * w)
            hub = np.where(r <= huber_delta, 1.0, huber_delta / np.maximum(r, 1e-300))
            if np.array_equal(new_assign, assign):
                break
            assign = new_assign
        return th, loss_of(th)

    starts: list[tuple[np.ndarray, np.ndarray]] = []
    th0 = np.array([1.0, 0.0, 1.0, 0.0])
    starts.append((xc >= xm, th0))
    starts.append((np.zeros(n, bool), th0))
    starts.append((np.ones(n, bool), th0))
    intensity = xc / np.maximum(xm, 1e-300)
    for q in (0.25, 0.5, 0.75, 0.9):
        thr = np.quantile(intensity, q)
        starts.append((intensity > thr, th0))
    best_th, best_loss = None, math.inf
    for assign, th in starts:
        th_fit, L_fit = alternate(assign.copy(), th.copy())
        n_comp = int(predict(th_fit)[1].sum())
        if min(n_comp, n - n_comp) < min_branch_points:
            continue  # a branch on 1-2 samples just interpolates noise
        if L_fit < best_loss - 1e-15:
            best_th, best_loss = th_fit, L_fit

    def single_branch(compute: bool) -> np.ndarray:
        """Every sample on one branch; the other extrapolated below the data."""
        x = xc if compute else xm
        hub = np.ones(n)
        th2 = np.array([1.0, 0.0])
        for _ in range(max_iter):
            th_prev = th2
            th2 = fit_branch(x, y, w * np.sqrt(hub), th2)
            r = np.abs((th2[0] * x + th2[1] - y) * w)
            hub = np.where(r <= huber_delta, 1.0, huber_delta / np.maximum(r, 1e-300))
            if np.allclose(th2, th_prev, rtol=1e-10, atol=1e-15):
                break
        pred1 = th2[0] * x + th2[1]
        other = _extrapolate_branch(xm if compute else xc, pred1, th2[0], th2[1])
        return np.concatenate([th2, other]) if compute else np.concatenate([other, th2])

    # model selection (BIC on the robust loss): a second branch must pay for
    # its two parameters, otherwise noise is fitted by a spurious branch
    def bic(th: np.ndarray, k: int) -> float:
        return n * math.log(max(2.0 * loss_of(th) / n, 1e-300)) + k * math.log(max(n, 2))

    cands = [] if best_th is None else [(bic(best_th, 4), best_th)]
    for compute in (False, True):
        th1 = single_branch(compute)
        cands.append((bic(th1, 2), th1))
    th = min(cands, key=lambda t: t[0])[1].copy()
    pred, assign = predict(th)

    def identified(mask: np.ndarray, x: np.ndarray) -> bool:
        if mask.sum() < max(2, min_branch_points):
            return False
        xs = x[mask]
        return bool(xs.max() > 1.05 * xs.min())

    comp_ok = identified(assign, xc)
    mem_ok = identified(~assign, xm)
    th_sel = th.copy()
    if not comp_ok and mem_ok:
        th[:2] = _extrapolate_branch(xc, pred, th[2], th[3])
    elif not mem_ok and comp_ok:
        th[2:] = _extrapolate_branch(xm, pred, th[0], th[1])
    pred2, assign2 = predict(th)
    if np.max(np.abs(pred2 - pred) / y) > 1e-9:  # extrapolation must not change the fit
        th = th_sel
        pred2, assign2 = predict(th)
    model = base.with_coeffs(RooflineCoeffs.from_array(th))
    return FitResult(
        model=model,
        measured=y,
        predicted=pred2,
        branch=assign2,
        total_tokens=tok,
        batch_sizes=bs,
        mean_context=mc,
        compute_identified=comp_ok,
        memory_identified=mem_ok,
        loss=loss_of(th),
    )


def _extrapolate_branch(x: np.ndarray, pred: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Unmeasured branch: the other branch's (slope, intercept), slope lowered
    so the branch stays at or below the fitted curve on every sample."""
    b = intercept
    room = (pred - b) / np.maximum(x, 1e-300)
    a = min(max(slope, 1.0), float(np.min(room)) * (1 - 1e-9)) if len(x) else slope
    if a < 0:
        a, b = 0.0, 0.0
    return np.array([a, b])


def probe_plan(
    batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    nodes_per_request: Sequence[int] = (0, 4, 8, 16, 32, 64, 128, 256),
    contexts: Sequence[int] = (256, 1024, 4096),
    max_tokens: int = 8192,
) -> list[list[tuple[int, int]]]:
    """Batch shapes to time for calibration: every (B, n, c) with B * (1 + n)
    <= max_tokens, each a list of B identical (1 + n, c) requests."""
    plan = []
    for c in contexts:
        for b in batch_sizes:
            for nn in nodes_per_request:
                if b * (1 + nn) <= max_tokens:
                    plan.append([(1 + int(nn), int(c))] * int(b))
    return plan


# --------------------------------------------------------------------------
# online refit
# --------------------------------------------------------------------------


class RobustEma:
    """EMA of a positive quantity (e.g. measured T_fix) with Huber-style
    clipping of isolated outliers; `confirm` consecutive same-sign outliers
    are accepted as a level change."""

    def __init__(self, value: float | None = None, alpha: float = 0.1, clip: float = 0.5, confirm: int = 3):
        self.value = None if value is None else float(value)
        self.alpha = float(alpha)
        self.clip = float(clip)
        self.confirm = int(confirm)
        self._run = 0
        self._sign = 0

    def update(self, x: float) -> float | None:
        x = float(x)
        if not math.isfinite(x) or x < 0:
            return self.value
        if self.value is None or self.value <= 0:
            self.value = x
            return self.value
        rel = (x - self.value) / self.value
        sign = 1 if rel > 0 else -1
        if abs(rel) > self.clip:
            self._run = self._run + 1 if sign == self._sign else 1
            self._sign = sign
            if self._run >= self.confirm:
                self.value = x  # level change confirmed: jump
                self._run = 0
                return self.value
            rel = sign * self.clip
        else:
            self._run = 0
        self.value = max(0.0, self.value * (1 + self.alpha * rel))
        return self.value


class OnlineRefit:
    """Recursive least squares with forgetting on the active branch's (a, b).

    Each measured verify forward (per-request (s_i, c_i), seconds) updates the
    coefficients of the branch the current model says is active:

        y / y_hat = a * (x / y_hat) + v * (t_ref / y_hat),   b = v * t_ref

    i.e. RLS on relative error (x = T_comp or T_mem of the step). Robustness:
      * the relative residual is clipped at `huber_k` robust scales (Huber);
        the scale is an EMA of clipped |residual| with floor `min_scale`;
      * `confirm` consecutive same-sign clipped residuals are taken as a
        regime change (device slowed down, other tenant, clocks): that sample
        is used unclipped and the branch covariance is reset, so a step change
        is tracked within a few steps;
      * a confirmed regime change also rescales the idle branch by the same
        factor (`propagate`), since slowdowns are usually device-wide; a
        branch is otherwise only learned while it is the active one;
      * covariance trace is capped (no wind-up when the regressor does not
        vary); coefficients are projected to >= 0; non-finite updates are
        rejected and leave the state unchanged.
    """

    def __init__(
        self,
        model: LatencyModel,
        *,
        forgetting: float = 0.95,
        huber_k: float = 3.0,
        min_scale: float = 0.02,
        scale_alpha: float = 0.1,
        confirm: int = 3,
        init_var: float = 0.05,
        max_var: float = 4.0,
        propagate: bool = True,
    ) -> None:
        if not (0 < forgetting <= 1):
            raise ValueError("forgetting must be in (0, 1]")
        self._model = model.copy()
        self.lam = float(forgetting)
        self.huber_k = float(huber_k)
        self.min_scale = float(min_scale)
        self.scale_alpha = float(scale_alpha)
        self.confirm = int(confirm)
        self.init_var = float(init_var)
        self.max_var = float(max_var)
        self.propagate = bool(propagate)
        ref = model.step_time([1], [0])
        self.t_ref = ref if math.isfinite(ref) and ref > 0 else 1e-3
        k = model.coeffs
        self._theta = {
            "compute": np.array([k.a_c, k.b_c / self.t_ref]),
            "memory": np.array([k.a_m, k.b_m / self.t_ref]),
        }
        self._P = {b: self._init_P(self._theta[b]) for b in self._theta}
        # robust residual scale and outlier run, per branch
        self._scale = {b: self.min_scale for b in self._theta}
        self._run = {b: 0 for b in self._theta}
        self._sign = {b: 0 for b in self._theta}
        self.num_updates = 0
        self.num_clipped = 0
        self.num_rejected = 0
        self.num_resets = 0
        self.fixed = RobustEma(model.t_fix if model.t_fix > 0 else None)

    def _init_P(self, th: np.ndarray) -> np.ndarray:
        # relative prior uncertainty on each coefficient (absolute floor 0.1)
        return np.diag(self.init_var * np.maximum(np.abs(th), 0.1) ** 2 + 1e-12)

    @property
    def model(self) -> LatencyModel:
        """The current model (a copy; safe to hand to the budget search)."""
        return self._model.copy()

    @property
    def coeffs(self) -> RooflineCoeffs:
        return RooflineCoeffs(**asdict(self._model.coeffs))

    def _write_back(self) -> None:
        tc, tm = self._theta["compute"], self._theta["memory"]
        self._model.coeffs = RooflineCoeffs(
            a_c=max(0.0, float(tc[0])),
            b_c=max(0.0, float(tc[1]) * self.t_ref),
            a_m=max(0.0, float(tm[0])),
            b_m=max(0.0, float(tm[1]) * self.t_ref),
        )

    def update(self, new_tokens: Any, contexts: Any, measured_seconds: float) -> bool:
        """Feed one measured verify forward. Returns False if it was rejected."""
        y = float(measured_seconds)
        try:
            s, c = _as_arrays(new_tokens, contexts)
        except ValueError:
            self.num_rejected += 1
            return False
        if not (math.isfinite(y) and y > 0) or len(s) == 0:
            self.num_rejected += 1
            return False
        tc, tm = self._model._raw(s, c)
        k = self._model.coeffs
        pc, pm = k.a_c * tc + k.b_c, k.a_m * tm + k.b_m
        branch = "compute" if pc >= pm else "memory"
        x = tc if branch == "compute" else tm
        y_hat = max(pc, pm)
        if not (math.isfinite(y_hat) and y_hat > 0 and math.isfinite(x)):
            y_hat = y
        phi = np.array([x / y_hat, self.t_ref / y_hat])
        th = self._theta[branch]
        P = self._P[branch]
        target = y / y_hat
        e = target - float(phi @ th)  # relative residual

        # Huber clipping with a robust running scale; confirmed runs = regime change
        thr = self.huber_k * self._scale[branch]
        reset = False
        if abs(e) > thr:
            sign = 1 if e > 0 else -1
            run = self._run[branch] + 1 if sign == self._sign[branch] else 1
            self._sign[branch] = sign
            if run >= self.confirm:
                reset = True
                run = 0
            else:
                self.num_clipped += 1
                e = sign * thr
            self._run[branch] = run
        else:
            self._run[branch] = 0
        self._scale[branch] = max(
            self.min_scale,
            (1 - self.scale_alpha) * self._scale[branch] + self.scale_alpha * min(abs(e), thr),
        )
        if reset:
            self.num_resets += 1
            P = self._init_P(th) * 25.0  # ~ +-100% relative uncertainty

        Pphi = P @ phi
        denom = self.lam + float(phi @ Pphi)
        gain = Pphi / denom
        th_new = th + gain * e
        P_new = (P - np.outer(gain, Pphi)) / self.lam
        P_new = 0.5 * (P_new + P_new.T)
        tr = float(np.trace(P_new))
        cap = self.max_var * float(np.sum(np.maximum(np.abs(th_new), 0.1) ** 2))
        if tr > cap:
            P_new *= cap / tr
        th_new = np.maximum(th_new, 0.0)
        if not (np.all(np.isfinite(th_new)) and np.all(np.isfinite(P_new))):
            self.num_rejected += 1
            self._P[branch] = self._init_P(th)
            return False
        if th_new[0] == 0.0 and th_new[1] == 0.0:
            th_new = th.copy()  # never collapse a branch to zero
        self._theta[branch] = th_new
        self._P[branch] = P_new
        if reset and self.propagate:
            # A confirmed level change is most often device-wide (clocks,
            # co-tenants): move the idle branch by the same factor now; its own
            # samples correct it later if the change was branch-specific.
            ratio = float(phi @ th_new) / max(float(phi @ th), 1e-12)
            if math.isfinite(ratio) and ratio > 0:
                ratio = min(max(ratio, 0.25), 4.0)
                other = "memory" if branch == "compute" else "compute"
                self._theta[other] = self._theta[other] * ratio
                self._P[other] = self._init_P(self._theta[other]) * 25.0
        self._write_back()
        self.num_updates += 1
        return True

    def update_fixed(self, measured_seconds: float) -> float:
        """Track T_fix (drafter forward + tree overhead per step)."""
        v = self.fixed.update(measured_seconds)
        if v is not None:
            self._model.t_fix = v
        return self._model.t_fix


# --------------------------------------------------------------------------
# profiles on disk
# --------------------------------------------------------------------------

PROFILE_FORMAT = 1


def _key_str(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True, default=str)


def profile_to_dict(model: LatencyModel, key: dict[str, Any], fit: FitResult | None = None) -> dict[str, Any]:
    d = {"key": dict(key), "model": model.to_dict()}
    if fit is not None:
        d["fit"] = fit.summary()
    return d


def profile_from_dict(d: dict[str, Any]) -> LatencyModel:
    return LatencyModel.from_dict(d["model"])


def save_profile(
    path: str | os.PathLike,
    key: dict[str, Any],
    model: LatencyModel,
    fit: FitResult | None = None,
) -> None:
    """Insert or replace the profile for `key` in a JSON file holding many
    profiles (key: e.g. {device, model_fingerprint, dtype, vllm_version}).
    Written atomically."""
    path = Path(path)
    data: dict[str, Any] = {"format": PROFILE_FORMAT, "profiles": []}
    if path.exists():
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path}: unknown profile format {data.get('format')!r}")
    ks = _key_str(key)
    data["profiles"] = [p for p in data.get("profiles", []) if _key_str(p["key"]) != ks]
    data["profiles"].append(profile_to_dict(model, key, fit))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_profile_entry(path: str | os.PathLike, key: dict[str, Any]) -> tuple[LatencyModel, float | None] | None:
    """The stored model for exactly `key` and the fit error (MAPE) stored with
    it (None if it was saved without a fit), or None (missing file or key)."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("format") != PROFILE_FORMAT:
        return None
    ks = _key_str(key)
    for p in data.get("profiles", []):
        if _key_str(p["key"]) == ks:
            mape = p.get("fit", {}).get("mape")
            return profile_from_dict(p), (float(mape) if mape is not None else None)
    return None


def load_profile(path: str | os.PathLike, key: dict[str, Any]) -> LatencyModel | None:
    """The stored model for exactly `key`, or None (missing file or key)."""
    entry = load_profile_entry(path, key)
    return entry[0] if entry is not None else None
