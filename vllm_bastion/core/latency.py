"""The calibrated roofline: seconds of one batched verify forward. Pure numpy.

    C(batch) = max(a_c * F / peak_flops + b_c,  a_m * M / bandwidth + b_m)

(F, M from core.model_shape; the a/b coefficients are fitted on the device by
core.latency_fit and tracked online by core.latency_refit). A round of
speculative decoding costs T_fix + C(batch), where T_fix is the drafter
forward plus the tree build / bookkeeping overhead (measured, not modelled).

Contents: `DevicePrior` (a device's datasheet roofline), `RooflineCoeffs`,
`LatencyModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .model_shape import ModelShape, _as_arrays, normalize_dtype, per_token_costs


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
