"""BASTION's one configuration model, and the start-up checks that need no model.

Every BASTION knob lives here; the defaults need no tuning. Users pass them in
vLLM's speculative config JSON next to "method" and "model":

    {"method": "bastion", "model": "/path/to/dflash-drafter", "max_nodes": 32}

This module imports nothing from vLLM.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# vLLM SpeculativeConfig keys that BASTION passes through unchanged.
VLLM_PASSTHROUGH_KEYS = (
    "model",
    "revision",
    "code_revision",
    "quantization",
    "draft_tensor_parallel_size",
    "max_model_len",
    "enforce_eager",
)

# vLLM keys that make no sense for BASTION, with the reason and the fix.
REFUSED_VLLM_KEYS = {
    "num_speculative_tokens": "BASTION sizes its trees itself; use 'max_nodes' "
    "(largest tree per request) instead",
    "method": "",
    "draft_sample_method": "BASTION keeps the drafter's top-k per depth; it never "
    "samples drafts",
    "rejection_sample_method": "BASTION verifies trees with its own lossless walk",
    "disable_padded_drafter_batch": "BASTION needs the padded drafter batch",
    "parallel_drafting": "DFlash drafters always draft in parallel",
    "num_speculative_tokens_per_batch_size": "BASTION sizes its trees itself; use "
    "'max_nodes'",
    "enable_adaptive_verification": "BASTION's tree budget replaces adaptive "
    "verification",
}


BASTION_ATTR = "bastion_config"  # the resolved config rides on the drafter's HF config


class BastionConfigError(ValueError):
    """A bad BASTION speculative config; the message names the problem and the fix."""


class BastionConfig(BaseModel):
    """Validated BASTION options (the speculative config with method 'bastion')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["bastion"] = "bastion"
    model: str = Field(description="Path or hub id of a DFlash drafter checkpoint.")

    max_nodes: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Largest draft tree per request and step, root excluded.",
    )
    min_nodes: int = Field(
        default=0,
        ge=0,
        le=1024,
        description="Smallest tree per request under the 'auto' budget (0 lets "
        "speculation switch itself off when it cannot pay).",
    )
    topk: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Tokens kept per draft depth (the tree's widest fan-out).",
    )
    draft_depth: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Draft depths the drafter predicts per step; default: the "
        "drafter's block_size - 1 (15 for b16 checkpoints).",
    )
    adaptive_depth: bool = Field(
        default=True,
        description="Under the 'auto' budget, draft each step only as deep as the "
        "budget's trees use (each request's last planned depth + 2, up to draft_depth; "
        "full depth for new requests and re-probes); False: always draft_depth.",
    )
    budget: Literal["auto", "fixed"] = Field(
        default="auto",
        description="'auto': one best-first budget per batch from the calibrated "
        "latency model, adding nodes while they raise expected tokens per second; "
        "'fixed': every tree grows to max_nodes.",
    )
    drafting: Literal["auto", "always", "never"] = Field(
        default="auto",
        description="'auto': before drafting, decide per request and step whether "
        "drafting pays, by the budget's own expected-tokens-per-second rule (requests "
        "that stop drafting are re-probed every reprobe_interval steps; when no "
        "request drafts, the drafter does not run); 'always': every decoding request "
        "drafts every step (as vLLM's chain); 'never': speculation off (BASTION's "
        "overhead floor, for benchmarks). With budget 'fixed' or min_nodes > 0, 'auto' "
        "means 'always'.",
    )
    reprobe_interval: int = Field(
        default=32,
        ge=1,
        le=100000,
        description="Decode steps after which a request that stopped drafting drafts "
        "once more to re-measure its acceptance (also when the batch halves).",
    )
    reprobe_backoff: int = Field(
        default=3,
        ge=0,
        le=16,
        description="A re-probe after which the request still does not draft doubles "
        "its interval, up to reprobe_interval * 2**reprobe_backoff steps (a request that "
        "drafts on its own starts over); 0: a fixed interval.",
    )
    acceptance_calibration: bool = Field(
        default=True,
        description="Learn online how often a node is accepted given its parent was, "
        "as a function of the drafter's log-prob and depth, and grow trees (and size "
        "them) by those calibrated path probabilities; False: BASTION's raw product of "
        "drafter marginals. Unused (and not learned) for fixed-size top-1 chains "
        "(topk 1 with budget 'fixed').",
    )
    calibrate: bool = Field(
        default=True,
        description="Probe the target on this device at start-up (cached on disk "
        "per device, model, dtype and vLLM version); False: datasheet roofline only.",
    )
    online_refit: bool = Field(
        default=True,
        description="Refit the latency model from measured step times while serving "
        "(and price the measured branch waves of CPU tree attention; off: the model "
        "as calibrated or given by device_profile is the whole verify cost).",
    )
    device_profile: str | None = Field(
        default=None,
        description="Roofline prior to use instead of the detected device: a device "
        "name from configs/roofline (e.g. 'H100') or a path to a prior JSON file.",
    )
    stats_log_interval_s: float = Field(
        default=10.0,
        ge=0.0,
        description="Seconds between BASTION tree-statistics log lines (0: never).",
    )

    # passed through to vLLM's SpeculativeConfig
    revision: str | None = None
    code_revision: str | None = None
    quantization: str | None = None
    draft_tensor_parallel_size: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    enforce_eager: bool | None = None

    @model_validator(mode="after")
    def _check(self) -> BastionConfig:
        if not self.model or not self.model.strip():
            raise ValueError("'model' must name a DFlash drafter checkpoint")
        if self.min_nodes > self.max_nodes:
            raise ValueError(
                f"min_nodes ({self.min_nodes}) must not exceed max_nodes ({self.max_nodes})"
            )
        if self.device_profile is not None and not self.device_profile.strip():
            raise ValueError("device_profile must be a device name or a JSON file path")
        return self

    @classmethod
    def from_user_dict(cls, raw: dict[str, Any]) -> BastionConfig:
        """Validate the user's speculative config dict with clear errors."""
        if not isinstance(raw, dict):
            raise BastionConfigError(
                f"The speculative config must be a JSON object, got {type(raw).__name__}."
            )
        raw = {str(k).replace("-", "_"): v for k, v in raw.items()}
        for key, why in REFUSED_VLLM_KEYS.items():
            if key in raw and key != "method":
                raise BastionConfigError(
                    f"speculative config key '{key}' is not supported with method "
                    f"'bastion': {why}."
                )
        known = set(cls.model_fields)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BastionConfigError(
                f"Unknown key(s) {unknown} in the BASTION speculative config. "
                f"Valid keys: {sorted(known)}."
            )
        if "model" not in raw or raw["model"] in (None, ""):
            raise BastionConfigError(
                "The BASTION speculative config needs 'model': the path (or hub id) "
                "of a DFlash drafter checkpoint, e.g. "
                '{"method": "bastion", "model": "/path/to/drafter"}.'
            )
        try:
            return cls(**raw)
        except ValidationError as e:
            problems = "; ".join(
                f"'{'.'.join(str(p) for p in err['loc']) or 'config'}': {err['msg']}"
                f" (got {err.get('input')!r})"
                for err in e.errors()
            )
            raise BastionConfigError(
                f"Invalid BASTION speculative config: {problems}."
            ) from None

    def vllm_passthrough(self) -> dict[str, Any]:
        return {
            k: getattr(self, k)
            for k in VLLM_PASSTHROUGH_KEYS
            if getattr(self, k) is not None
        }

    def resolved_depth(self, drafter_cfg: dict[str, Any]) -> int:
        """Draft depth D: the drafter's block minus the bonus slot, capped by max_nodes."""
        depth = self.draft_depth
        if depth is None:
            block = drafter_cfg.get("block_size") or (
                drafter_cfg.get("dflash_config") or {}
            ).get("block_size")
            depth = int(block) - 1 if block else 15
        return max(1, min(depth, self.max_nodes))


# ----------------------------------------------------------------- checkpoints


def read_drafter_config(model: str, revision: str | None = None) -> dict[str, Any]:
    """config.json of a drafter, from a local folder or the HF hub."""
    path = os.path.expanduser(model)
    if os.path.isdir(path):
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_file):
            raise BastionConfigError(
                f"The drafter folder {path!r} has no config.json; 'model' must point "
                "to a DFlash drafter checkpoint folder."
            )
        try:
            with open(cfg_file, encoding="utf-8") as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise BastionConfigError(
                f"Cannot read the drafter config {cfg_file!r}: {e}."
            ) from None
    if os.path.exists(path) or path.startswith(("/", "./", "../")):
        raise BastionConfigError(
            f"The drafter {model!r} does not exist or is not a folder; 'model' must "
            "be a DFlash drafter checkpoint folder or hub id."
        )
    try:  # a hub id
        from huggingface_hub import hf_hub_download

        cfg_file = hf_hub_download(model, "config.json", revision=revision)
        with open(cfg_file, encoding="utf-8") as f:
            return json.load(f)
    except Exception as e:  # noqa: BLE001 - any hub failure is a config problem here
        raise BastionConfigError(
            f"Cannot find the drafter {model!r}: it is not a local folder and its "
            f"config.json could not be fetched from the hub ({type(e).__name__}: {e})."
        ) from None


def check_drafter_matches_target(
    drafter: dict[str, Any], target: dict[str, Any], drafter_name: str = "drafter"
) -> None:
    """Start-up checks of a DFlash drafter config against the target's HF config.

    Raises BastionConfigError naming the mismatch. Both args are plain dicts
    (config.json contents / PretrainedConfig.to_dict()).
    """
    archs = drafter.get("architectures") or []
    dflash = drafter.get("dflash_config")
    if not isinstance(dflash, dict) or not any("DFlash" in str(a) for a in archs):
        raise BastionConfigError(
            f"{drafter_name} is not a DFlash drafter (architectures={archs}, "
            f"dflash_config={'present' if isinstance(dflash, dict) else 'missing'}). "
            "BASTION needs a block-diffusion DFlash checkpoint in z-lab's format: "
            "architectures ['DFlashDraftModel'] and a dflash_config with "
            "mask_token_id and target_layer_ids."
        )
    mask_id = dflash.get("mask_token_id", drafter.get("mask_token_id"))
    layer_ids = dflash.get("target_layer_ids")
    if not isinstance(mask_id, int):
        raise BastionConfigError(
            f"{drafter_name}'s dflash_config has no integer mask_token_id "
            f"(got {mask_id!r})."
        )
    if not isinstance(layer_ids, list) or not layer_ids or not all(
        isinstance(i, int) for i in layer_ids
    ):
        raise BastionConfigError(
            f"{drafter_name}'s dflash_config.target_layer_ids must be a non-empty "
            f"list of target layer indices (got {layer_ids!r})."
        )
    t_vocab = target.get("vocab_size")
    d_vocab = drafter.get("vocab_size")
    if t_vocab is not None and d_vocab is not None and t_vocab != d_vocab:
        raise BastionConfigError(
            f"{drafter_name} was trained for another target: its vocab_size is "
            f"{d_vocab} but the target's is {t_vocab}."
        )
    if t_vocab is not None and not 0 <= mask_id < t_vocab:
        raise BastionConfigError(
            f"{drafter_name}'s mask_token_id {mask_id} is outside the target "
            f"vocabulary [0, {t_vocab})."
        )
    t_hidden = target.get("hidden_size")
    d_target_hidden = drafter.get("target_hidden_size") or drafter.get("hidden_size")
    if t_hidden is not None and d_target_hidden is not None and t_hidden != d_target_hidden:
        raise BastionConfigError(
            f"{drafter_name} was trained for another target: it expects target "
            f"hidden size {d_target_hidden} but the target's hidden_size is {t_hidden}."
        )
    n_layers = target.get("num_hidden_layers")
    if n_layers is not None:
        bad = [i for i in layer_ids if not 0 <= i <= n_layers - 2]
        if bad:
            raise BastionConfigError(
                f"{drafter_name}'s dflash_config.target_layer_ids {layer_ids} include "
                f"{bad}, outside [0, {n_layers - 2}] for a target with {n_layers} "
                "layers: the drafter was trained for another target."
            )
    n_target = drafter.get("num_target_layers")
    if n_layers is not None and isinstance(n_target, int) and n_target != n_layers:
        raise BastionConfigError(
            f"{drafter_name} was trained for a {n_target}-layer target, but the "
            f"target has {n_layers} layers."
        )


HYBRID_LAYER_TYPES = ("mamba", "linear_attention", "conv", "recurrent", "ssm", "gdn")


def check_target_supported(target: dict[str, Any]) -> None:
    """Refuse targets the tree verifier cannot handle (pure-attention only)."""
    layer_types = [str(t).lower() for t in (target.get("layer_types") or [])]
    bad = sorted({t for t in layer_types if any(h in t for h in HYBRID_LAYER_TYPES)})
    archs = [str(a) for a in (target.get("architectures") or [])]
    hybrid_arch = [
        a for a in archs if any(h in a.lower() for h in ("mamba", "jamba", "nemotronh", "falconh", "granitemoehybrid", "qwen3next", "zamba", "lfm2"))
    ]
    if bad or hybrid_arch:
        what = f"layer types {bad}" if bad else f"architecture {hybrid_arch}"
        raise BastionConfigError(
            f"BASTION needs a pure-attention target; this target has {what}. Tree "
            "verification of recurrent (Mamba / linear-attention) state is not "
            "supported. Use a dense attention target (e.g. Qwen3, Llama)."
        )
    if target.get("use_sliding_window") or any("sliding" in t for t in layer_types):
        raise BastionConfigError(
            "BASTION's tree attention does not support sliding-window targets yet; "
            "use a full-attention target."
        )


def bastion_config_of(config: Any) -> BastionConfig | None:
    """The resolved BASTION config of a VllmConfig or SpeculativeConfig, or None."""
    spec = getattr(config, "speculative_config", config)
    if spec is None:
        return None
    draft = getattr(spec, "draft_model_config", None)
    hf = getattr(draft, "hf_config", None) if draft is not None else None
    raw = getattr(hf, BASTION_ATTR, None) if hf is not None else None
    if raw is None:
        return None
    if isinstance(raw, BastionConfig):
        return raw
    return BastionConfig(**raw)
