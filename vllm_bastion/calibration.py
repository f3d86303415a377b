"""Calibrating BASTION's latency model on the actual device (vLLM glue).

The probe times the target's verify forward through vLLM's own
`_dummy_run` (the same compiled model, attention backend and kernels that
serve requests) for a grid of (new tokens, context) shapes, plus the LM head
on every row, and fits the roofline coefficients of
`vllm_bastion.core.latency` (fit: core.latency_fit). The fit is cached on disk (vllm_bastion.profiles), keyed by device,
model, dtype, vLLM version and execution mode, and reused at the next start.

CLI: python -m vllm_bastion.calibrate --model TARGET [--drafter DRAFTER]
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from vllm_bastion.core.latency import DevicePrior, LatencyModel
from vllm_bastion.core.latency_fit import FitResult, fit_latency_model
from vllm_bastion.core.model_shape import ModelShape
from vllm_bastion.profiles import load_device_prior, load_profile_entry, save_profile

PROBE_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PROBE_CONTEXTS = (64, 512, 2048)
WARMUP, REPEATS = 2, 3
# Slow devices: a forward that takes LONG_S needs one warm-up and one timed
# run (its start-up and the timer's noise are small against it), and once a
# shape takes CAP_S the larger token counts at that context are not probed:
# the forward is compute-bound there and the fit extrapolates in FLOPs. (On a
# 2-core AVX2 CPU a 256-token forward of a 0.36B-parameter target takes ~20 s
# and the full grid took 4 minutes; on a GPU every shape is far below both.)
LONG_S, CAP_S = 0.25, 1.0


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {cpu} ({torch.get_num_threads()} threads)"


def cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "vllm_bastion" / "profiles.json"


def model_shape(vllm_config) -> ModelShape:
    mc = vllm_config.model_config
    hf = (getattr(mc, "hf_text_config", None) or mc.hf_config).to_dict()
    dtype = str(mc.dtype).replace("torch.", "")
    return ModelShape.from_hf_config(hf, dtype=dtype)


def profile_key(runner, shape: ModelShape) -> dict:
    import vllm

    vc = runner.vllm_config
    return {
        "device": device_name(runner.device),
        "model": shape.fingerprint(),
        "dtype": shape.dtype,
        "kv_cache_dtype": str(vc.cache_config.cache_dtype),
        "vllm": vllm.__version__,
        "tp": vc.parallel_config.tensor_parallel_size,
        "compilation": str(vc.compilation_config.mode),
        "cudagraph": str(vc.compilation_config.cudagraph_mode),
        "block_size": vc.cache_config.block_size,
    }


def resolve_prior(runner, device_profile: str | None) -> DevicePrior:
    if device_profile:
        if os.path.isfile(device_profile):
            with open(device_profile, encoding="utf-8") as f:
                return DevicePrior.from_dict(json.load(f))
        return load_device_prior(device_profile)
    prior = load_device_prior(device_name(runner.device))
    tp = runner.vllm_config.parallel_config.tensor_parallel_size
    return prior.aggregate(tp) if tp > 1 else prior


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_forward_seconds(forward) -> float:
    """Median seconds of `forward()` (which returns its own seconds) after
    warm-up: WARMUP warm-ups and REPEATS timed runs for short forwards; one
    warm-up, and timed runs only until they add up to LONG_S, for long ones."""
    if forward() < LONG_S:
        for _ in range(WARMUP - 1):
            forward()
    times = []
    while len(times) < REPEATS and sum(times) < LONG_S:
        times.append(forward())
    return float(np.median(times))


@torch.inference_mode()
def probe(runner, tokens=PROBE_TOKENS, contexts=PROBE_CONTEXTS, progress: bool = True):
    """Time the target's forward + LM head for single-request (s, c) shapes
    (token counts up to the first that takes CAP_S, per context).

    Runs vLLM's `_dummy_run` (no KV writes: its slots are -1) with the
    request's context spread over distinct KV blocks, so attention reads as
    much memory as in serving.
    """
    max_tokens = min(runner.max_num_tokens, runner.max_model_len)
    plan = [
        (s, c)
        for c in contexts
        for s in tokens
        if s <= max_tokens and c + s <= runner.max_model_len
    ]
    it = plan
    if progress:
        try:
            from tqdm import tqdm

            it = tqdm(plan, desc="BASTION calibration probe", leave=False)
        except ImportError:
            pass
    group = _tp_group()
    drafter = getattr(runner, "drafter", None)
    tables = runner.input_batch.block_table.block_tables
    saved = [bt.block_table.cpu[0].clone() for bt in tables]
    samples = []
    try:
        if drafter is not None:
            drafter._bastion_skip_dummy = True
        for bt in tables:  # context over distinct blocks (contents are irrelevant)
            width = bt.block_table.cpu.shape[1]
            nblk = min(width, runner.kv_cache_config.num_blocks)
            bt.block_table.cpu[0, :nblk] = torch.arange(nblk, dtype=bt.block_table.cpu.dtype)
        capped = set()  # contexts at which a shape took CAP_S
        for s, c in it:
            if c in capped:
                continue

            def forward():
                _sync(runner.device)
                t0 = time.perf_counter()
                hidden, _ = runner._dummy_run(
                    s, force_attention=True, profile_seq_lens=c + s, skip_eplb=True,
                    allow_microbatching=False,
                )
                runner.model.compute_logits(hidden[:s])
                _sync(runner.device)
                # with TP every rank runs the same forwards: rank 0's timings decide
                return _from_rank0(group, time.perf_counter() - t0)

            t = median_forward_seconds(forward)
            samples.append(([(s, c)], t))
            if t >= CAP_S:
                capped.add(c)
    finally:
        if drafter is not None:
            drafter._bastion_skip_dummy = False
        for bt, row in zip(tables, saved):
            bt.block_table.cpu[0] = row
            bt.block_table.gpu[0] = row.to(bt.block_table.gpu.device)
    return samples


@torch.inference_mode()
def probe_drafter(runner) -> float:
    """Seconds of one drafter forward (context precompute + query block), batch 1,
    timed as the target's shapes are (`median_forward_seconds`, rank 0's timings)."""
    drafter = getattr(runner, "drafter", None)
    if drafter is None:
        return 0.0
    D = getattr(drafter, "draft_depth", drafter.num_speculative_tokens)
    group = _tp_group()

    def forward():
        _sync(runner.device)
        t0 = time.perf_counter()
        drafter.dummy_run(1 + D, use_cudagraphs=False)
        _sync(runner.device)
        return _from_rank0(group, time.perf_counter() - t0)

    return median_forward_seconds(forward)


def calibrate(runner, *, device_profile: str | None = None, use_cache: bool = True,
              progress: bool = True, log=None) -> tuple[LatencyModel, FitResult | None, str, float | None]:
    """The latency model for this runner: cached fit, or probe + fit + cache.

    Returns (model, fit or None if loaded from cache, source description, fit
    error (MAPE) of the probe or of the cached fit, None if unknown).
    """
    shape = model_shape(runner.vllm_config)
    prior = resolve_prior(runner, device_profile)
    key = profile_key(runner, shape)
    key["prior"] = prior.name
    path = cache_file()
    if use_cache:
        cached = load_profile_entry(path, key)
        if cached is not None:
            return cached[0], None, f"cached fit from {path}", cached[1]
    t0 = time.perf_counter()
    samples = probe(runner, progress=progress)
    t_draft = probe_drafter(runner)
    fit = fit_latency_model(samples, shape, prior, t_fix=t_draft)
    model = fit.model
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
    except Exception:  # noqa: BLE001 - no distributed state: single process
        rank = 0
    if rank == 0:
        try:
            save_profile(path, key, model, fit)
        except OSError as e:
            if log is not None:
                log.warning("BASTION could not cache the calibration at %s: %s", path, e)
    return model, fit, f"probed {len(samples)} shapes in {time.perf_counter() - t0:.1f}s", fit.mape


def _tp_group():
    try:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: single process
        return None
    return group if group.world_size > 1 else None


def _from_rank0(group, obj):
    """`obj` as TP rank 0 has it (every rank calls this in lockstep); `obj` without TP."""
    return obj if group is None else group.broadcast_object(obj, src=0)


def startup_model(runner, *, calibrate: bool, device_profile: str | None, log=None
                  ) -> tuple[LatencyModel, str, float | None]:
    """The latency model the engine starts with, made once and shared.

    With `calibrate`, the cached fit (read by TP rank 0) or a probe (every rank
    runs the target forward in lockstep, rank 0 fits and caches); otherwise
    the datasheet roofline. With tensor parallelism rank 0's model is
    broadcast, so every rank plans with the same model.
    """
    group = _tp_group()
    rank0 = group is None or group.rank_in_group == 0

    if not calibrate:
        shape = model_shape(runner.vllm_config)
        prior = resolve_prior(runner, device_profile)
        model = LatencyModel.from_prior(shape, prior, t_fix=probe_drafter(runner))
        model = _from_rank0(group, model.to_dict() if rank0 else None)
        return LatencyModel.from_dict(model), f"uncalibrated prior {prior.name}", None
    shape = model_shape(runner.vllm_config)
    prior = resolve_prior(runner, device_profile)
    key = profile_key(runner, shape)
    key["prior"] = prior.name
    path = cache_file()
    cached = load_profile_entry(path, key) if rank0 else None
    cached = _from_rank0(group, None if cached is None else (cached[0].to_dict(), cached[1]))
    if cached is not None:
        return LatencyModel.from_dict(cached[0]), f"cached fit from {path}", cached[1]
    t0 = time.perf_counter()
    samples = probe(runner, progress=rank0)
    t_draft = probe_drafter(runner)
    out = None
    if rank0:
        fit = fit_latency_model(samples, shape, prior, t_fix=t_draft)
        try:
            save_profile(path, key, fit.model, fit)
        except OSError as e:
            if log is not None:
                log.warning("BASTION could not cache the calibration at %s: %s", path, e)
        out = (fit.model.to_dict(), fit.mape)
    model_d, mape = _from_rank0(group, out)
    return (LatencyModel.from_dict(model_d),
            f"probed {len(samples)} shapes in {time.perf_counter() - t0:.1f}s", mape)
