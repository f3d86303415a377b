"""BASTION on vLLM's V1 model runner (CPU, and GPU with VLLM_USE_V2_MODEL_RUNNER=0).

One decoding step for a request that has a draft tree:

  scheduler       schedules the root (last verified token) + the tree's nodes,
                  flattened in best-first order, as ordinary spec tokens
  _prepare_inputs rows keep their sequential KV slots; positions of node rows
                  are rewritten to root + depth; the step's trees and ancestor
                  masks are attached to the target's attention metadata
  forward         target layers run tree attention for node rows
  _sample         the target's token at every row (its own sampling), then the
                  acceptance walk; the accepted path's KV and activations are
                  moved so the path is contiguous, as if a chain had been verified
  propose         vLLM's DFlash drafter (block 1 + D) keeps top-k per depth;
                  the next trees are built best-first and handed to the
                  scheduler as spec tokens

Everything downstream of `_sample` (scheduler accounting, prefix caching, the
drafter's context, spec-decode metrics) sees a chain of accepted tokens and is
vLLM's own, unchanged.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.outputs import SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner, _torch_cuda_wrapper
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_bastion._patches import bastion_config_of
from vllm_bastion.core.acceptance import NUM_CLASSES, AcceptanceCalibrator
from vllm_bastion.core.budget import plan_batch_budget
from vllm_bastion.core.compaction import compaction_pairs, permute_rows_
from vllm_bastion.core.cost_model import OnlineRefit
from vllm_bastion.core.tree import (
    TreeBatch,
    ancestor_mask,
    build_best_first_trees,
    chain_tree,
    path_classes,
)
from vllm_bastion.core.walk import accept_walk
from vllm_bastion.kernels import HAS_TRITON, compact_kv, compact_kv_reference, pack_ancestor_bits
from vllm_bastion.proposer import BastionProposer
from vllm_bastion.sampling import target_tokens
from vllm_bastion.stats import StatsLogger
from vllm_bastion import tree_attention as _tree_attention
from vllm_bastion.tree_attention import (
    METADATA_ATTR,
    TreeAttentionStep,
    install_tree_attention,
    paged_kv_views,
)

logger = init_logger("vllm.bastion")


class _Step:
    """Host-side description of the trees verified in this step."""

    def __init__(self, trees: TreeBatch, row_starts: np.ndarray, root_pos: np.ndarray,
                 rows_per_req: np.ndarray, attn: TreeAttentionStep | None,
                 scheduled: np.ndarray, computed: np.ndarray):
        self.trees = trees  # [B, W], one row per request in the batch
        self.row_starts = row_starts  # [B]
        self.root_pos = root_pos  # [B] position of the sampled row 0
        self.rows_per_req = rows_per_req  # [B] logits rows (1 + nodes)
        self.attn = attn
        self.scheduled = scheduled  # [B] tokens each request feeds (latency model)
        self.computed = computed  # [B] context each request attends to


def _ema(prev: float | None, x: float, a: float = 0.1) -> float:
    """Exponential moving average (the first sample starts it)."""
    return x if prev is None else (1 - a) * prev + a * x


class _Budget:
    """The 'auto' budget: calibrated latency model, online refit, timings."""

    def __init__(self):
        self.refit: OnlineRefit | None = None
        self.source = ""
        self.fit_error: float | None = None  # calibration MAPE
        self.err_ema: float | None = None  # online |predicted - measured| / measured
        self.t_fix: float | None = None  # seconds per step outside the verify forward
        self.gap_ema: float | None = None  # host time between steps (scheduler, IPC)
        self.last_end: float | None = None
        self.planned_steps = 0
        self.planned_nodes = 0

    def observe_fixed(self, seconds: float) -> None:
        self.t_fix = _ema(self.t_fix, seconds)

    def summary(self) -> dict:
        out = {"source": self.source, "calibration_mape": self.fit_error,
               "refit_rel_error": self.err_ema, "t_fix_s": self.t_fix,
               "mean_planned_nodes": self.planned_nodes / max(self.planned_steps, 1)}
        if self.refit is not None:
            m = self.refit.model
            out.update(a_c=m.coeffs.a_c, b_c=m.coeffs.b_c, a_m=m.coeffs.a_m, b_m=m.coeffs.b_m,
                       peak_flops=m.peak_flops, bandwidth=m.bandwidth, device=m.device_name)
        return out


class BastionRunnerMixin:
    """Overrides of the V1 GPUModelRunner hooks (also the base of CPUModelRunner)."""

    def _bastion_init(self) -> None:
        cfg = bastion_config_of(self.vllm_config)
        assert cfg is not None
        self.bastion_config = cfg
        self.bastion_stats = StatsLogger(cfg.stats_log_interval_s, _stats_file(self.vllm_config))
        # trees proposed last step: (TreeBatch of the batch, {req_id: row})
        self._bastion_pending: tuple[TreeBatch, dict[str, int]] | None = None
        self._bastion_step: _Step | None = None
        self._bastion_attach = False
        self._bastion_layers: list[str] = []
        self._bastion_exec = None  # (aux_hidden_states, slot_mappings) of the step
        self._bastion_budget = _Budget() if cfg.budget == "auto" else None
        self.bastion_stats.budget = self._bastion_budget
        self.bastion_acceptance = (
            AcceptanceCalibrator(cfg.draft_depth) if cfg.acceptance_calibration else None
        )
        self.bastion_stats.acceptance = self.bastion_acceptance
        if hasattr(self, "drafter"):
            self.drafter = BastionProposer(
                self.vllm_config, self.device, self,
                draft_depth=cfg.draft_depth, topk=min(cfg.topk, cfg.max_nodes),
            )
        logger.info(
            "BASTION tree speculation: DFlash drafter %s, draft depth %d, top-%d per "
            "depth, trees of up to %d nodes (%s budget)",
            cfg.model, cfg.draft_depth, min(cfg.topk, cfg.max_nodes), cfg.max_nodes, cfg.budget,
        )

    # ------------------------------------------------------------ load

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self._bastion_layers = install_tree_attention(self.get_model())
        logger.info("BASTION tree attention on %d target layers", len(self._bastion_layers))

    # ------------------------------------------------------------ inputs

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        t0 = time.perf_counter()
        self._bastion_step = self._bastion_build_step(scheduler_output, num_scheduled_tokens)
        self.bastion_stats.timer.add("build_step", time.perf_counter() - t0)
        self._bastion_attach = True
        return out

    def _bastion_build_step(self, scheduler_output, num_scheduled_tokens) -> _Step:
        batch = self.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        spec = scheduler_output.scheduled_spec_decode_tokens
        sched = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
        row_starts = np.cumsum(sched) - sched
        computed = batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)

        nodes = np.zeros(num_reqs, dtype=np.int64)
        src = np.zeros(num_reqs, dtype=np.int64)  # row of the pending tree batch
        fallback: list[int] = []
        pending, pending_rows = self._bastion_pending or (None, {})
        ptoks = pending.tokens.numpy() if pending is not None else None
        pnodes = pending.num_nodes.numpy() if pending is not None else None
        for i, rid in enumerate(req_ids):
            draft = spec.get(rid)
            if not draft:
                continue
            n = len(draft)
            nodes[i] = n
            j = pending_rows.get(rid)
            if j is not None and pnodes[j] >= n and np.array_equal(ptoks[j, 1 : 1 + n], draft):
                src[i] = j
            else:
                fallback.append(i)  # drafts BASTION did not build as a tree: a chain
        self._bastion_pending = None
        keep = nodes.copy()
        keep[fallback] = 0
        if pending is not None:
            trees = pending.select(torch.from_numpy(src)).truncate(torch.from_numpy(keep))
        else:
            trees = chain_tree([[] for _ in range(num_reqs)])
        if fallback:
            rows = [trees.select([i]) for i in range(num_reqs)]
            for i in fallback:
                rows[i] = chain_tree([list(spec[req_ids[i]])])
            trees = _stack_trees(rows)
        # the sampled row 0 of a request is its first spec row (root) or, for a
        # prefill chunk, its last scheduled row
        root_pos = computed + sched - 1 - nodes
        rows_per_req = 1 + nodes

        attn = None
        has_tree = np.nonzero(nodes > 0)[0]
        if len(has_tree):
            # node rows: RoPE position = root position + depth (slots stay sequential)
            depth = trees.depths.numpy()
            r_idx, col = np.nonzero(depth > 0)
            flat_rows = row_starts[r_idx] + col
            new_pos = root_pos[r_idx] + depth[r_idx, col]
            idx = torch.from_numpy(flat_rows).to(self.positions.device)
            self.positions[idx] = torch.from_numpy(new_pos).to(self.positions)
            sel = trees.select(has_tree.tolist())
            anc_bits = pack_ancestor_bits(ancestor_mask(sel))
            gid = self._bastion_group()

            def dev(x):
                return torch.as_tensor(np.asarray(x), dtype=torch.int32).to(self.device)

            attn = TreeAttentionStep(
                tree_req=dev(has_tree),
                row_start=dev(row_starts[has_tree]),
                num_nodes=dev(nodes[has_tree]),
                prefix_len=dev(root_pos[has_tree]),
                anc_bits=anc_bits.to(self.device),
                max_nodes=int(nodes.max()),
                block_size=self.input_batch.block_table[gid].block_size,
                num_blocks=self.kv_cache_config.num_blocks,
            )
        return _Step(trees, row_starts, root_pos, rows_per_req, attn, sched, computed)

    def _bastion_group(self) -> int:
        name = self._bastion_layers[0]
        for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
            if name in group.layer_names:
                return gid
        raise RuntimeError(f"BASTION: layer {name} is in no KV cache group")

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_cad = super()._build_attention_metadata(*args, **kwargs)
        info = None
        if self._bastion_attach and self._bastion_step is not None:
            info = self._bastion_step.attn
            self._bastion_attach = False
        mds = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
        for per_layer in mds:
            if not isinstance(per_layer, dict):
                continue
            for name in self._bastion_layers:
                md = per_layer.get(name)
                if md is not None:
                    setattr(md, METADATA_ATTR, info)
        return attn_metadata, spec_cad

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        budget = self._bastion_budget
        if budget is not None and budget.refit is None and scheduler_output.total_num_scheduled_tokens:
            self._bastion_calibrate()
        t0 = time.perf_counter()
        fix0 = _tree_attention.FIXUP_SECONDS[0]
        out = super().execute_model(scheduler_output, intermediate_tensors)
        timer = self.bastion_stats.timer
        timer.steps += 1
        timer.add("verify_forward", time.perf_counter() - t0)
        timer.add("step_total", time.perf_counter() - t0)
        timer.add("tree_attention", _tree_attention.FIXUP_SECONDS[0] - fix0)
        st = self.execute_model_state
        self._bastion_exec = (st.aux_hidden_states, st.slot_mappings) if st is not None else None
        if budget is not None and st is not None and self._bastion_step is not None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            verify = time.perf_counter() - t0
            step = self._bastion_step
            self._bastion_observe_verify(step.scheduled, step.computed, verify)
            if budget.last_end is not None:
                gap = t0 - budget.last_end  # scheduler, IPC, output processing
                if gap < 0.25:  # idle engines are not overhead
                    budget.gap_ema = _ema(budget.gap_ema, gap)
        return out

    def sample_tokens(self, grammar_output):
        budget = self._bastion_budget
        t0 = time.perf_counter()
        out = super().sample_tokens(grammar_output)
        t1 = time.perf_counter()
        self.bastion_stats.timer.add("sample_total", t1 - t0)
        self.bastion_stats.timer.add("step_total", t1 - t0)
        if budget is not None:
            budget.observe_fixed((t1 - t0) + (budget.gap_ema or 0.0))
            if budget.refit is not None and self.bastion_config.online_refit:
                budget.refit.update_fixed(budget.t_fix)
            budget.last_end = t1
        return out

    # ------------------------------------------------------------ cost model

    def _bastion_calibrate(self) -> None:
        from vllm_bastion import calibration

        cfg = self.bastion_config
        budget = self._bastion_budget
        if cfg.calibrate:
            model, _, source, budget.fit_error = calibration.calibrate(
                self, device_profile=cfg.device_profile, log=logger)
        else:
            shape = calibration.model_shape(self.vllm_config)
            prior = calibration.resolve_prior(self, cfg.device_profile)
            from vllm_bastion.core.cost_model import LatencyModel

            model = LatencyModel.from_prior(shape, prior, t_fix=calibration.probe_drafter(self))
            source = f"uncalibrated prior {prior.name}"
        if budget.t_fix is None:
            budget.t_fix = model.t_fix  # until steps are measured: the drafter forward
        budget.refit = OnlineRefit(model)
        budget.source = source
        logger.info("BASTION latency model (%s): %s", source, model)

    def _bastion_observe_verify(self, scheduled, computed, seconds: float) -> None:
        budget = self._bastion_budget
        if budget.refit is None or not len(scheduled):
            return
        pred = budget.refit.model.step_time(scheduled, computed)
        budget.err_ema = _ema(budget.err_ema, abs(pred - seconds) / max(seconds, 1e-9))
        if self.bastion_config.online_refit:
            budget.refit.update(scheduled, computed, seconds)

    def _bastion_plan(self, trees: TreeBatch, sampled_token_ids) -> torch.Tensor:
        """Per-request node counts for the next step (one budget for the batch)."""
        cfg = self.bastion_config
        budget = self._bastion_budget
        B = trees.batch_size
        if budget is None or budget.refit is None:
            return trees.num_nodes
        n_valid = (
            (sampled_token_ids[:B] >= 0).sum(dim=1).cpu().numpy()
            if torch.is_tensor(sampled_token_ids)
            else np.array([len(x) for x in sampled_token_ids[:B]])
        )
        contexts = self.input_batch.num_tokens_no_spec[:B] + n_valid - 1
        decoding = ~self.discard_request_mask.np[:B].astype(bool) & (n_valid > 0)
        caps = torch.from_numpy(np.where(decoding, cfg.max_nodes, 0)).long()
        room = self.max_num_tokens - B * (1 + cfg.draft_depth)
        decision = plan_batch_budget(
            trees.scores, torch.from_numpy(np.maximum(contexts, 0)), budget.refit.model,
            t_fix=budget.t_fix if budget.t_fix is not None else budget.refit.model.fixed_time(B),
            min_nodes=torch.where(caps > 0, cfg.min_nodes, 0), max_nodes=caps, exact=True,
            max_total_nodes=max(0, room),
        )
        n = decision.num_nodes.cpu()
        budget.planned_steps += 1
        budget.planned_nodes += int(n.sum())
        return n

    # ------------------------------------------------------------ verify

    def _sample(self, logits, spec_decode_metadata):
        step = self._bastion_step
        if spec_decode_metadata is None or step is None:
            return super()._sample(logits, spec_decode_metadata)
        self._bastion_step = None
        self.input_batch.update_async_output_token_ids()
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        trees = step.trees
        W = trees.width
        counts = torch.from_numpy(step.rows_per_req)

        # absolute position each row predicts: root_pos + depth + 1
        depth_rows = torch.cat([trees.depths[b, : int(counts[b])] for b in range(num_reqs)])
        pos_rows = torch.from_numpy(step.root_pos).repeat_interleave(counts) + depth_rows + 1
        seeds = [self.requests[r].sampling_params.seed for r in req_ids]
        timer = self.bastion_stats.timer
        t0 = time.perf_counter()
        tok = target_tokens(
            logits, counts, self.input_batch.sampling_metadata, seeds, pos_rows
        ).cpu()
        t1 = time.perf_counter()
        timer.add("target_tokens", t1 - t0)

        target = torch.full((num_reqs, W), -1, dtype=torch.long)
        col = torch.cat([torch.arange(int(c)) for c in counts])
        target[torch.arange(num_reqs).repeat_interleave(counts), col] = tok
        result = accept_walk(trees, target)
        if self.bastion_acceptance is not None and trees.node_logq is not None:
            t = result.tested_mask
            self.bastion_acceptance.update(
                trees.depths[t], trees.node_logq[t], result.accepted_mask[t],
                path_classes(trees, NUM_CLASSES - 1)[t])

        t2 = time.perf_counter()
        timer.add("walk", t2 - t1)
        self._bastion_compact(step, result)
        timer.add("compaction", time.perf_counter() - t2)
        has = (trees.num_nodes > 0).nonzero().squeeze(1).tolist()
        if has:
            self.bastion_stats.observe(
                nodes=trees.num_nodes[has].tolist(),
                accepted=result.num_accepted[has].tolist(),
                chain=result.chain_accepted[has].tolist(),
                depths=trees.depths[has].max(dim=1).values.tolist(),
            )
        sampled = result.output_tokens.to(device=self.device, dtype=torch.int32)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=None)

    def _bastion_compact(self, step: _Step, result) -> None:
        """Make every accepted path contiguous in the KV cache and activations."""
        src, dst = compaction_pairs(
            torch.from_numpy(step.row_starts), result.path_nodes, result.num_accepted
        )
        if src.numel() == 0:
            return
        src_d, dst_d = src.to(self.device), dst.to(self.device)
        aux, slot_mappings = self._bastion_exec or (None, None)
        ctx = self.compilation_config.static_forward_context
        caches, slots = [], None
        for name in self._bastion_layers:
            layer = ctx[name]
            caches.append(paged_kv_views(layer.impl, layer, layer.kv_cache, step.attn))
            slots = slot_mappings.get(name) if isinstance(slot_mappings, dict) else None
        if slots is None:
            raise RuntimeError("BASTION: no slot mapping for the target layers")
        src_slots, dst_slots = slots[src_d].long(), slots[dst_d].long()
        if caches[0][0].is_cuda and HAS_TRITON:
            compact_kv(caches, src_slots, dst_slots)
        else:
            compact_kv_reference(caches, src_slots, dst_slots)
        for h in aux or ():
            permute_rows_(h, src_d, dst_d)
        permute_rows_(self.positions, src_d, dst_d)
        permute_rows_(self.input_ids.gpu, src_d, dst_d)

    def _bookkeeping_sync(self, *args, **kwargs):
        # vLLM rewinds the per-request generators of discarded (partial prefill)
        # rows; BASTION never draws from them (see sampling.py), so hide them.
        gens = self.input_batch.generators
        self.input_batch.generators = {}
        try:
            return super()._bookkeeping_sync(*args, **kwargs)
        finally:
            self.input_batch.generators = gens

    # ------------------------------------------------------------ draft

    def _input_fits_in_drafter(self, common_attn_metadata) -> bool:
        if common_attn_metadata is None:
            return False
        return (
            common_attn_metadata.max_seq_len + self.bastion_config.draft_depth + 1
            <= self.effective_drafter_max_model_len
        )

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, *args, **kwargs):
        timer = self.bastion_stats.timer
        t0 = time.perf_counter()
        super().propose_draft_token_ids(scheduler_output, sampled_token_ids, *args, **kwargs)
        t1 = time.perf_counter()
        timer.add("draft", t1 - t0)
        topk = self.drafter.take_topk()
        num_reqs = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:num_reqs]
        if topk is None:
            self._bastion_pending = None
            return [[] for _ in req_ids]
        logp, toks = (t[:num_reqs].cpu() for t in topk)
        cal = self.bastion_acceptance
        trees = build_best_first_trees(
            logp, toks, max_nodes=self.bastion_config.max_nodes,
            class_values=cal.class_values(logp) if cal is not None else None)
        # every rank keeps the full tree; the scheduler's (rank 0's) node count
        # truncates it next step (any best-first prefix is a tree)
        self._bastion_pending = (trees, {rid: i for i, rid in enumerate(req_ids)})
        t2 = time.perf_counter()
        timer.add("tree_build", t2 - t1)
        if self._bastion_budget is not None:
            trees = trees.truncate(self._bastion_plan(trees, sampled_token_ids))
            timer.add("budget", time.perf_counter() - t2)
        return trees.node_lists()

    def _copy_draft_token_ids_to_cpu(self, scheduler_output, zeros_only: bool = False):
        if zeros_only:
            # vLLM zeroes drafts when the drafter cannot run (near max_model_len);
            # BASTION schedules no tree instead of a chain of zeros.
            self._draft_token_ids = [[] for _ in self.input_batch.req_ids]
            self._bastion_pending = None
        return super()._copy_draft_token_ids_to_cpu(scheduler_output, zeros_only=False)


def _stats_file(vllm_config) -> str | None:
    """The front end's /metrics file for this engine (written by TP rank 0 only)."""
    from vllm_bastion.metrics import STATS_FILE_ATTR

    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        if get_tensor_model_parallel_rank() != 0:
            return None
    except Exception:  # noqa: BLE001 - no distributed state: single process
        pass
    hf = vllm_config.speculative_config.draft_model_config.hf_config
    return getattr(hf, STATS_FILE_ATTR, None)


def _stack_trees(rows: list[TreeBatch]) -> TreeBatch:
    W = max(t.width for t in rows)

    def pad(x, fill):
        return torch.nn.functional.pad(x, (0, W - x.shape[1]), value=fill)

    return TreeBatch(
        tokens=torch.cat([pad(t.tokens, -1) for t in rows]),
        parents=torch.cat([pad(t.parents, -1) for t in rows]),
        depths=torch.cat([pad(t.depths, -1) for t in rows]),
        ranks=torch.cat([pad(t.ranks, -1) for t in rows]),
        scores=torch.cat([pad(t.scores, float("-inf")) for t in rows]),
        num_nodes=torch.cat([t.num_nodes for t in rows]),
        node_logq=torch.cat([
            pad(t.node_logq if t.node_logq is not None else torch.full_like(t.scores, float("-inf")),
                float("-inf")) for t in rows]),
    )


class BastionGPUModelRunner(BastionRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._bastion_init()


class BastionCPUModelRunner(BastionRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        with _torch_cuda_wrapper():
            self._bastion_init()
