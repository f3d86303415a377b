"""Latency models and device priors on disk (file I/O around core.latency).

  * device priors: configs/roofline/*.json (installed as vllm_bastion.configs),
    matched to a device name;
  * calibrated profiles: one JSON file of fitted models, keyed by a
    caller-provided dict (device, model, dtype, vLLM version, ...).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any


from vllm_bastion.core.latency import DevicePrior, LatencyModel
from vllm_bastion.core.latency_fit import FitResult


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
        return Path(__file__).resolve().parents[1] / "configs" / "roofline"


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
