"""BASTION's hooks on vLLM's V1 model runner (CPU, and GPU with VLLM_USE_V2_MODEL_RUNNER=0).

The step itself is engine-agnostic and lives in vllm_bastion/core (step.py:
layout, plan, walk, compaction plan; budget.py; tree.py). These hooks only
move data between vLLM and the core:

  _prepare_inputs   the scheduler scheduled, per request, a prefix of the
                    nodes BASTION sent last step (spine first, see
                    core/step.py): take the matching pending trees, plan the
                    step, rewrite the RoPE positions of branch rows
  _build_attention_metadata
                    attach the step's tree attention (branch rows, their
                    ancestor masks, the backend's metadata for all other
                    rows) to the target layers' metadata
  forward           the backend computes every row but the branch rows
                    (their K/V are written as usual); tree attention
                    computes the branch rows (vllm_bastion/tree_attention.py)
  _sample           the target's token at every tree row (its own sampling),
                    the acceptance walk, and the compaction of accepted
                    paths (KV of all target layers + the drafter's inputs)
  propose_draft_token_ids
                    vLLM's DFlash drafter (top-k per depth), best-first trees,
                    the batch budget, spine-first layout; node lists to the
                    scheduler as spec tokens

Everything downstream of `_sample` (scheduler accounting, prefix caching, the
drafter's context, spec-decode metrics) sees a chain of accepted tokens and is
vLLM's own, unchanged.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, SamplerOutput
from vllm.v1.worker.cpu_model_runner import CPUModelRunner, _torch_cuda_wrapper
from vllm.v1.worker.gpu_model_runner import GPUModelRunner

from vllm_bastion._patches import DRAFTS_ATTR
from vllm_bastion.config import bastion_config_of
from vllm_bastion.core.acceptance import NUM_CLASSES, AcceptanceCalibrator
from vllm_bastion.core.compaction import permute_rows_
from vllm_bastion.core.draft_depth import next_allowed_depth, planned_depths, step_block_depth
from vllm_bastion.core.gating import DraftingEstimates, back_off_probes, probes_due
from vllm_bastion.core.paths import keep_columns, row_layout
from vllm_bastion.core.step import (
    StepPlan,
    finish_step,
    pad_trees,
    plan_step,
    replace_rows,
    sampled_row_depths,
    spine_first,
)
from vllm_bastion.core.tree import TreeBatch, build_best_first_trees, chain_tree, empty_trees, path_classes
from vllm_bastion.drafting import Backlog, context_slots, ragged_concat, ragged_rows, sub_batch_metadata
from vllm_bastion.engine_budget import EngineBudget, now
from vllm_bastion.kernels import HAS_TRITON, compact_kv, compact_kv_reference, pack_ancestor_bits
from vllm_bastion.proposer import BastionProposer
from vllm_bastion.request_table import RequestTable
from vllm_bastion.processing import NodeProcessor, needs_node_processing, tree_logprobs, wants_logprobs
from vllm_bastion.sampling import target_tokens
from vllm_bastion.stats import StatsLogger
from vllm_bastion.structured_trees import KEPT_ATTR, PARENTS_ATTR
from vllm_bastion import tree_attention as _tree_attention
from vllm_bastion.tree_attention import (
    METADATA_ATTR,
    TreeAttentionStep,
    chain_rows_per_query,
    install_tree_attention,
    kv_cache_views,
)

logger = init_logger("vllm.bastion")

BACKLOG_TOKENS = 64  # context tokens a non-drafting request may owe the drafter


class BastionTreeMismatch(RuntimeError):
    """The scheduled drafts are not the tree this worker built (e.g. TP ranks
    disagree): verifying anything else would silently lose acceptance."""


class BastionRunnerMixin:
    """Overrides of the V1 GPUModelRunner hooks (also the base of CPUModelRunner)."""

    def _bastion_init(self) -> None:
        cfg = bastion_config_of(self.vllm_config)
        assert cfg is not None
        self.bastion_config = cfg
        self.bastion_stats = StatsLogger(cfg.stats_log_interval_s, _stats_file(self.vllm_config))
        # trees sent to the scheduler last step (layout order) and their rows' req ids
        self._bastion_pending: tuple[TreeBatch, list[str]] | None = None
        self._bastion_plan: StepPlan | None = None
        self._bastion_attach = False
        # CPU: every verify row computed by the backend as a chain row
        # (tree_attention.TreeAttentionStep.build_chain_exact)
        self._bastion_chain_exact = self.device.type == "cpu"
        self._bastion_chain_rows: int | None = None  # rows per one-row-exact query block
        self._bastion_layers: list[str] = []
        self._bastion_kv_views: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._bastion_exec = None  # (aux_hidden_states, slot_mappings) of the step
        self._bastion_structured = True  # the step schedules structured-output requests
        self._bastion_verify_t0 = 0.0
        self._bastion_waves = 0  # branch waves of the step's chain-exact tree attention
        self._bastion_budget = EngineBudget(cfg) if cfg.budget == "auto" else None
        self.bastion_stats.budget = self._bastion_budget
        # calibrated values order a tree's nodes (top-k > 1) and price them
        # ('auto' budget); a fixed-size top-1 chain uses neither
        calibrated = cfg.acceptance_calibration and (cfg.topk > 1 or cfg.budget == "auto")
        self.bastion_acceptance = AcceptanceCalibrator(cfg.draft_depth) if calibrated else None
        self.bastion_stats.acceptance = self.bastion_acceptance
        self.bastion_table = RequestTable(self.max_num_reqs, on_new_slot=self._bastion_new_slot)
        self.bastion_table.defaults(depth=cfg.draft_depth)
        self.bastion_estimates = DraftingEstimates(tau=cfg.reprobe_interval / 4)
        self._bastion_backlog: Backlog | None = None  # built at the first draft (feature size)
        self._bastion_sched = np.zeros(0, dtype=np.int64)  # scheduled tokens per request
        self._bastion_computed = np.zeros(0, dtype=np.int64)  # cached tokens per request
        self._bastion_verified = None  # (nodes, accepted) per request of this step's trees
        self._bastion_draft_rows: np.ndarray | None = None
        self._bastion_nodes = NodeProcessor()  # per-node penalties, bad words, ...
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

    # ------------------------------------------------------------ start-up

    def load_model(self, *args, **kwargs):
        super().load_model(*args, **kwargs)
        self._bastion_layers = install_tree_attention(self.get_model())
        self._bastion_target_groups: list[str] = []  # one target layer per metadata object
        logger.info("BASTION tree attention on %d target layers", len(self._bastion_layers))

    def initialize_kv_cache(self, *args, **kwargs):
        out = super().initialize_kv_cache(*args, **kwargs)
        self._bastion_kv_views = None
        # layers of one attention group share one metadata object per step
        self._bastion_target_groups = [
            next(n for n in g.layer_names if n in self._bastion_layers)
            for groups in self.attn_groups for g in groups
            if any(n in self._bastion_layers for n in g.layer_names)]
        if not kwargs.get("is_profiling", False) and self._bastion_budget is not None:
            # calibrate at start-up (cached per device/model/...), not on the
            # first request; every TP rank probes in lockstep
            self._bastion_calibrate()
        return out

    def _bastion_calibrate(self) -> None:
        from vllm_bastion import calibration

        cfg = self.bastion_config
        model, source, fit_error = calibration.startup_model(
            self, calibrate=cfg.calibrate, device_profile=cfg.device_profile, log=logger)
        self._bastion_budget.set_model(model, source, fit_error)
        logger.info("BASTION latency model (%s): %s", source, model)

    # ------------------------------------------------------------ inputs

    def _update_states(self, scheduler_output):
        out = super()._update_states(scheduler_output)
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        if gone:
            self.bastion_table.finish(gone)
        return out

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        out = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        t0 = now()
        num_reqs = self.input_batch.num_reqs
        self.bastion_table.sync(self.input_batch.req_ids[:num_reqs], self.requests)
        self._bastion_sched = np.asarray(num_scheduled_tokens[:num_reqs], dtype=np.int64)
        self._bastion_computed = self.input_batch.num_computed_tokens_cpu[:num_reqs].astype(np.int64)
        self._bastion_verified = None
        self._bastion_plan = self._bastion_plan_step(
            out[1], getattr(scheduler_output, KEPT_ATTR, None))
        self.bastion_stats.timer.add("build_step", now() - t0)
        self._bastion_attach = True
        return out

    def _bastion_pending_trees(self, n: np.ndarray, kept: dict | None = None) -> TreeBatch:
        """This step's trees: the pending trees of every request, restricted to
        the nodes the grammar kept (structured outputs, `kept`: request id ->
        kept node indices, see structured_trees.py) and truncated to the nodes
        the scheduler scheduled; drafts of requests without a pending tree
        (scheduled from an older step) are verified as chains."""
        num_reqs = len(n)
        req_ids = self.input_batch.req_ids[:num_reqs]
        pending, pending_ids = self._bastion_pending or (None, [])
        self._bastion_pending = None
        if pending is not None and pending_ids == req_ids:
            trees = _keep_nodes(pending, kept, req_ids).truncate(torch.from_numpy(n))
            known = np.ones(num_reqs, dtype=bool)
        else:  # the batch changed since the trees were built
            index = {rid: i for i, rid in enumerate(pending_ids)}
            src = np.array([index.get(rid, -1) for rid in req_ids], dtype=np.int64)
            known = src >= 0
            if pending is not None and known.any():
                trees = pending.select(torch.from_numpy(np.maximum(src, 0)))
                trees = _keep_nodes(trees, kept, req_ids)
                trees = trees.truncate(torch.from_numpy(np.where(known, n, 0)))
            else:
                trees = chain_tree([[] for _ in range(num_reqs)])
        stale = (~known) & (n > 0)
        if stale.any():
            trees = _with_chains(trees, stale, n, self._bastion_draft_tokens(n))
        return trees

    def _bastion_draft_tokens(self, n: np.ndarray) -> np.ndarray:
        """[B, max n] the scheduled draft tokens (input ids of node rows), -1 pad."""
        num_reqs = len(n)
        sched = np.asarray(self._bastion_sched[:num_reqs], dtype=np.int64)
        row_start = np.cumsum(sched) - sched
        width = int(n.max()) if num_reqs else 0
        cols = np.arange(width)[None, :]
        live = cols < n[:, None]
        rows = (row_start + (sched - n))[:, None] + cols  # node rows follow the root
        ids = self.input_ids.cpu.numpy()
        return np.where(live, ids[np.where(live, rows, 0)], -1)

    def _bastion_plan_step(self, spec_md, kept: dict | None = None) -> StepPlan | None:
        if spec_md is None or not any(spec_md.num_draft_tokens):
            # no tree this step (vLLM builds speculative metadata even for zero
            # drafts): vLLM's own sampling path, no walk
            self._bastion_pending = None
            return None
        sched = self._bastion_sched
        n = np.asarray(spec_md.num_draft_tokens, dtype=np.int64)
        trees = self._bastion_pending_trees(n, kept)
        drafts = self._bastion_draft_tokens(n)
        width = drafts.shape[1]
        if width and not np.array_equal(
                np.where(drafts >= 0, trees.tokens[:, 1 : 1 + width].numpy(), -1), drafts):
            bad = np.nonzero((np.where(drafts >= 0, trees.tokens[:, 1 : 1 + width].numpy(), -1)
                              != drafts).any(axis=1))[0]
            raise BastionTreeMismatch(
                f"BASTION: the drafts scheduled for {len(bad)} request(s) (first: "
                f"{self.input_batch.req_ids[int(bad[0])]}) are not the tree this worker "
                "built. With tensor parallelism every rank must build the same trees; "
                "this is a bug, please report it.")
        row_start = np.cumsum(sched) - sched
        root_pos = self._bastion_computed + sched - 1 - n
        plan = plan_step(trees, row_start, sched, root_pos, pack_bits=pack_ancestor_bits)
        if plan.num_branch_rows:
            # branch rows: RoPE position = root position + depth (slots stay sequential)
            self.positions[plan.branch_rows.to(self.positions.device)] = plan.branch_pos.to(
                self.positions)
        return plan

    def _bastion_group(self) -> int:
        name = self._bastion_layers[0]
        for gid, group in enumerate(self.kv_cache_config.kv_cache_groups):
            if name in group.layer_names:
                return gid
        raise RuntimeError(f"BASTION: layer {name} is in no KV cache group")

    def _build_attention_metadata(self, *args, **kwargs):
        attn_metadata, spec_cad = super()._build_attention_metadata(*args, **kwargs)
        plan = None
        if self._bastion_attach:
            plan = self._bastion_plan
            self._bastion_attach = False
        info = None  # None: the backend computes every row
        if plan is not None and bool(plan.trees.num_nodes.any()):
            timer = self.bastion_stats.timer
            if self._bastion_needs_tree_step(plan):
                info = self._bastion_tree_attention_step(plan, spec_cad)
                timer.tree_metadata_steps += 1
            else:
                timer.vllm_metadata_steps += 1
        # one metadata object per attention group (a builder may reuse it, so
        # it is always set, also to None)
        mds = attn_metadata if isinstance(attn_metadata, list) else [attn_metadata]
        for per_layer in mds:
            if isinstance(per_layer, dict):
                for md in {id(m): m for m in map(per_layer.get, self._bastion_target_groups)
                           if m is not None}.values():
                    setattr(md, METADATA_ATTR, info)
        return attn_metadata, spec_cad

    def _bastion_needs_tree_step(self, plan: StepPlan) -> bool:
        """Whether the backend, run on vLLM's own metadata, would not compute
        this step's verify rows as BASTION needs them: branch rows (tree
        attention), or on the chain-exact path a chain longer than one
        one-row-exact query block. Chains that fit one block are exactly
        the requests of vLLM's batch, so the backend computes them as is."""
        if plan.num_branch_rows:
            return True
        if not self._bastion_chain_exact:
            return False
        if self._bastion_chain_rows is None:
            self._bastion_chain_rows = chain_rows_per_query(self._bastion_attn_group())
        return bool((plan.trees.num_nodes + 1 > self._bastion_chain_rows).any())

    def _bastion_attn_group(self):
        gid = self._bastion_group()
        return next(g for g in self.attn_groups[gid] if self._bastion_layers[0] in g.layer_names)

    def _bastion_tree_attention_step(self, plan: StepPlan, cad) -> TreeAttentionStep:
        gid = self._bastion_group()
        drafter_gid = getattr(getattr(self, "drafter", None), "kv_cache_gid", gid)
        if cad is None or drafter_gid != gid:
            raise RuntimeError("BASTION needs the target and the drafter in one KV cache group")
        group = self._bastion_attn_group()
        step = TreeAttentionStep.build(
            plan, cad, group, self.device,
            block_size=self.input_batch.block_table[gid].block_size,
            num_blocks=self.kv_cache_config.num_blocks,
            max_nodes=self.bastion_config.max_nodes,
            chain_exact=self._bastion_chain_exact,
        )
        self._bastion_waves = len(step.waves or ())
        return step

    # ------------------------------------------------------------ forward

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        t0 = now()
        self._bastion_structured = getattr(scheduler_output, "has_structured_output_requests", True)
        fix0 = _tree_attention.FIXUP_SECONDS[0]
        self._bastion_waves = 0
        out = super().execute_model(scheduler_output, intermediate_tensors)
        t1 = now()
        fix = _tree_attention.FIXUP_SECONDS[0] - fix0
        timer = self.bastion_stats.timer
        timer.steps += 1
        timer.add("verify_forward", t1 - t0)
        timer.add("step_total", t1 - t0)
        timer.add("tree_attention", fix)
        timer.branch_waves += self._bastion_waves
        st = self.execute_model_state
        self._bastion_exec = (st.aux_hidden_states, st.slot_mappings) if st is not None else None
        budget = self._bastion_budget
        if budget is not None and st is not None and budget.ready:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                t1 = now()
            # the latency model prices the forward; branch waves are priced apart
            budget.observe_verify(self._bastion_sched, self._bastion_computed, t1 - t0 - fix, t0)
            plan = self._bastion_plan
            if plan is not None and bool(plan.trees.num_nodes.any()):
                budget.observe_waves(self._bastion_waves, fix)
        return out

    def sample_tokens(self, grammar_output):
        t0 = now()
        plan = self._bastion_plan
        trees = plan is not None and bool(plan.trees.num_nodes.any())  # this step verifies trees
        out = super().sample_tokens(grammar_output)
        if out is not None and out is not EMPTY_MODEL_RUNNER_OUTPUT:  # never tag the shared one
            # the engine core's take_draft_token_ids is answered from this
            # output, without a third RPC per step (_patches.py, patch 9)
            setattr(out, DRAFTS_ATTR, self.take_draft_token_ids())
        t1 = now()
        self.bastion_stats.timer.add("sample_total", t1 - t0)
        self.bastion_stats.timer.add("step_total", t1 - t0)
        if self._bastion_budget is not None:
            self._bastion_budget.observe_outside(t1 - t0, t1, spec=trees)
        return out

    # ------------------------------------------------------------ verify

    def _sample(self, logits, spec_decode_metadata):
        plan = self._bastion_plan
        if spec_decode_metadata is None or plan is None:
            if self._bastion_has_seeded_sampling():
                return self._bastion_sample_plain(logits)
            return super()._sample(logits, spec_decode_metadata)
        self._bastion_plan = None
        self.input_batch.update_async_output_token_ids()
        timer = self.bastion_stats.timer
        counts = plan.sampled_rows
        pos_rows = plan.root_pos.repeat_interleave(counts) + sampled_row_depths(plan) + 1
        tok, processed = self._bastion_choose(logits, plan.trees, counts, pos_rows)
        t1 = now()
        result = finish_step(plan, tok.cpu())
        walk = result.walk
        trees = plan.trees
        if self.bastion_acceptance is not None and trees.node_logq is not None:
            t = walk.tested_mask
            classes = trees.classes if trees.classes is not None else path_classes(trees, NUM_CLASSES - 1)
            self.bastion_acceptance.update(
                trees.depths[t], trees.node_logq[t], walk.accepted_mask[t], classes[t])
        t2 = now()
        timer.add("walk", t2 - t1)
        self._bastion_compact(result.src_rows, result.dst_rows)
        timer.add("compaction", now() - t2)
        self.bastion_stats.observe_step(trees.num_nodes, walk.num_accepted, walk.chain_accepted,
                                        trees.depths.max(dim=1).values)
        self._bastion_verified = (trees.num_nodes.numpy(), walk.num_accepted.numpy())
        sampled = walk.output_tokens.to(device=self.device, dtype=torch.int32)
        logprobs = self._bastion_logprobs(logits, processed, counts, walk.output_tokens,
                                          walk.path_nodes, walk.num_accepted)
        return SamplerOutput(sampled_token_ids=sampled, logprobs_tensors=logprobs)

    def _bastion_choose(self, logits, trees: TreeBatch, counts: torch.Tensor,
                        pos_rows: torch.Tensor):
        """The target's token for every sampled row (rows as `trees`' nodes,
        `counts` per request, `pos_rows`: the position each row predicts):
        per-node penalties, bad words, min_tokens and allowed tokens with the
        request's history plus the node's own path (processing.py), then
        greedy or keyed sampling. Returns (tokens, processed logits)."""
        timer = self.bastion_stats.timer
        t0 = now()
        table = self.bastion_table
        seeds = None
        if table["has_seed"].any():
            seeds = (torch.from_numpy(table["seed"]), torch.from_numpy(table["has_seed"]))
        sm = self.input_batch.sampling_metadata
        work = logits
        if needs_node_processing(self.input_batch, sm):
            mode = self.model_config.logprobs_mode
            work = self._bastion_nodes.process(
                logits, trees, row_layout(trees), self.input_batch, sm,
                keep_raw=wants_logprobs(sm) and not mode.startswith("processed"))
        t_proc = now()
        timer.add("node_processing", t_proc - t0)
        tok, processed = target_tokens(work, counts, sm, seeds, pos_rows, return_processed=True)
        timer.add("target_tokens", now() - t_proc)
        return tok, processed

    def _bastion_logprobs(self, logits, processed, counts, output_tokens, path_nodes,
                          num_accepted):
        """vLLM's logprobs tensors for the emitted tokens (None unless asked)."""
        sm = self.input_batch.sampling_metadata
        if not wants_logprobs(sm):
            return None
        t0 = now()
        out = tree_logprobs(logits, processed, self.model_config.logprobs_mode,
                            torch.cumsum(counts, 0) - counts, output_tokens, path_nodes,
                            num_accepted, sm)
        self.bastion_stats.timer.add("logprobs", now() - t0)
        return out

    def _bastion_has_seeded_sampling(self) -> bool:
        """A request with a seed samples (temperature > 0) in this step."""
        sm = self.input_batch.sampling_metadata
        if sm.all_greedy:
            return False
        n = self.input_batch.num_reqs
        has_seed = self.bastion_table["has_seed"][:n]
        if not has_seed.any():
            return False
        temp = self.input_batch.temperature_cpu[:n]  # host copy: no device sync
        return bool((has_seed & (temp >= 1e-5)).any())

    def _bastion_sample_plain(self, logits):
        """A step without trees, one row per request, sampled as the tree
        steps sample: a seeded request's draw for the token at position p is
        keyed by (seed, p) in every step, so whether a step had trees (which
        the auto budget decides from timings) never changes its tokens."""
        n = self.input_batch.num_reqs
        self.input_batch.update_async_output_token_ids()
        counts = torch.ones(n, dtype=torch.long)
        pos = torch.from_numpy(self._bastion_computed[:n] + self._bastion_sched[:n])
        trees = empty_trees(n)
        tok, processed = self._bastion_choose(logits[:n], trees, counts, pos)
        out = tok.view(-1, 1)
        logprobs = self._bastion_logprobs(logits[:n], processed, counts, out,
                                          torch.zeros((n, 0), dtype=torch.long),
                                          torch.zeros(n, dtype=torch.long))
        return SamplerOutput(sampled_token_ids=out.to(self.device, torch.int32),
                             logprobs_tensors=logprobs)

    def _bastion_compact(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Make every accepted path contiguous in the KV cache and activations."""
        if src.numel() == 0:
            return
        src_d, dst_d = src.to(self.device), dst.to(self.device)
        aux, slot_mappings = self._bastion_exec or (None, None)
        slots = slot_mappings.get(self._bastion_layers[0]) if isinstance(slot_mappings, dict) else None
        if slots is None:
            raise RuntimeError("BASTION: no slot mapping for the target layers")
        if self._bastion_kv_views is None:
            self._bastion_kv_views = kv_cache_views(
                self.compilation_config.static_forward_context, self._bastion_layers,
                self.input_batch.block_table[self._bastion_group()].block_size,
                self.kv_cache_config.num_blocks)
        caches = self._bastion_kv_views
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
        # BASTION decides per request (propose_draft_token_ids); vLLM's
        # batch-wide check would skip feeding the drafter's context instead
        return common_attn_metadata is not None

    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata,
                                hidden_states, sample_hidden_states, aux_hidden_states,
                                spec_decode_metadata, common_attn_metadata, slot_mappings):
        """Decide who drafts (core/gating.py), feed every request's new context
        to the drafter now or later (vllm_bastion/drafting.py), draft for the
        drafting requests only, and build, size and lay out their trees."""
        timer = self.bastion_stats.timer
        t0 = now()
        cfg = self.bastion_config
        B = self.input_batch.num_reqs
        req_ids = self.input_batch.req_ids[:B]
        table = self.bastion_table
        sched = self._bastion_sched[:B]
        row_start = np.cumsum(sched) - sched
        nodes, acc = self._bastion_verified if self._bastion_verified is not None else (
            np.zeros(B, np.int64), np.zeros(B, np.int64))
        self._bastion_verified = None
        valid = np.where(nodes > 0, 1 + acc, sched)  # this step's context rows
        ctx_end = self._bastion_computed[:B] + valid
        decoding = ~self.discard_request_mask.np[:B].astype(bool)
        self._bastion_learn(nodes, acc, decoding)
        fits = ctx_end + cfg.draft_depth + 1 <= self.effective_drafter_max_model_len
        eligible = decoding & fits
        drafts = self._bastion_gate(eligible, ctx_end)
        table["drafted"][:] = drafts
        self.bastion_stats.observe_drafting(int(eligible.sum()), int(drafts.sum()))
        if cfg.drafting == "never":  # the drafter never needs its context
            self._bastion_pending = None
            return [[] for _ in req_ids]

        backlog = self._bastion_get_backlog(aux_hidden_states)
        slots = table["slot"]
        later = ~drafts & decoding & fits & (backlog.count[slots] + valid <= backlog.capacity)
        feed = ~drafts & ~later & fits

        def context(sel):  # (backlog counts + current rows) features/positions of sel
            idx = np.nonzero(sel)[0]
            cur = ragged_rows(row_start[idx], valid[idx])
            rows = torch.from_numpy(cur).to(self.device)
            f_cur = torch.cat([h[rows] for h in aux_hidden_states], dim=-1)
            p_cur = self.positions[rows]
            bc, bf, bp = backlog.take(slots[idx])
            return (idx, bc + valid[idx], ragged_concat(bc, bf, valid[idx], f_cur),
                    ragged_concat(bc, bp, valid[idx], p_cur))

        if later.any():
            idx = np.nonzero(later)[0]
            rows = torch.from_numpy(ragged_rows(row_start[idx], valid[idx])).to(self.device)
            backlog.append(slots[idx], valid[idx],
                           torch.cat([h[rows] for h in aux_hidden_states], dim=-1), self.positions[rows])
        model = self.drafter.model

        # drafter context K/V written directly: requests that do not draft
        # and whose backlog is full (context()), and resuming requests'
        # backlogs (not passed to the drafter's forward, whose context
        # buffers hold only one step's tokens, max_num_batched_tokens)
        parts = [context(feed)] if feed.any() else []
        back = drafts & (backlog.count[slots] > 0)
        if back.any():
            idx = np.nonzero(back)[0]
            parts.append((idx, *backlog.take(slots[idx])))
        if parts:
            idx, counts = (np.concatenate([x[i] for x in parts]) for i in (0, 1))
            f, p = (torch.cat([x[i] for x in parts]) for i in (2, 3))
            req = torch.from_numpy(np.repeat(idx, counts)).to(self.device)
            slot_map = context_slots(common_attn_metadata.block_table_tensor, req, p,
                                     self.drafter.block_size)
            model.precompute_and_store_context_kv(model.combine_hidden_states(f), p, slot_map)
        t1 = now()
        timer.add("draft_context", t1 - t0)
        if not drafts.any():
            self._bastion_pending = None
            return [[] for _ in req_ids]

        next_ids, valid_count = self.drafter.prepare_next_token_ids_padded(
            sampled_token_ids, self.requests, self.input_batch, self.discard_request_mask.gpu)
        self._copy_valid_sampled_token_count(next_ids, valid_count)
        idx, counts, f, p = context(drafts)
        self._bastion_draft_rows = idx  # batch rows of the drafter's output rows
        sub = sub_batch_metadata(common_attn_metadata, idx, counts, ctx_end[idx], self.device)
        sel = torch.from_numpy(idx).to(self.device)
        budget = self._bastion_budget
        auto = budget is not None and budget.ready
        # under the auto budget the drafter's block follows the planned trees (core/draft_depth.py)
        adaptive = auto and cfg.adaptive_depth
        depth = step_block_depth(table["depth"][idx], cfg.draft_depth) if adaptive else cfg.draft_depth
        self.drafter.draft_depth = depth
        self.bastion_stats.observe_block(depth)
        self.drafter.propose(
            num_speculative_tokens=depth, target_token_ids=p, target_positions=p,
            target_hidden_states=f, next_token_ids=next_ids[sel], token_indices_to_sample=None,
            common_attn_metadata=sub, sampling_metadata=sampling_metadata, mm_embed_inputs=None,
            num_rejected_tokens_gpu=None, slot_mappings=slot_mappings)
        logp, toks = (t.cpu() for t in self.drafter.take_topk())
        t2 = now()
        timer.add("draft", t2 - t1)
        cal = self.bastion_acceptance
        trees = build_best_first_trees(
            logp, toks, max_nodes=cfg.max_nodes,
            class_values=cal.class_values(logp) if cal is not None else None)
        t3 = now()
        timer.add("tree_build", t3 - t2)
        if auto:
            room = self.max_num_tokens - B - len(idx) * cfg.draft_depth
            n = budget.plan(trees.scores, ctx_end[idx] - 1, np.ones(len(idx), bool), room,
                            parents=trees.parents)
            trees = trees.truncate(_same_on_all_tp_ranks(n))
            table["depth"][idx] = next_allowed_depth(planned_depths(trees.depths), cfg.draft_depth)
            timer.add("budget", now() - t3)
        if cfg.topk > 1:  # top-1 trees are chains: already spine first
            trees, _ = spine_first(trees)
        full = _scatter_trees(trees, idx, B)
        self._bastion_pending = (full, list(req_ids))
        if budget is not None:
            budget.observe_draft(len(idx), now() - t1)
        return full.node_lists()

    def _bastion_learn(self, nodes: np.ndarray, acc: np.ndarray, decoding: np.ndarray) -> None:
        """Update every request's drafting estimates from this step's walk."""
        t = self.bastion_table
        drafted = t["drafted"]
        self.bastion_estimates.update(t["gain"], t["nodes"], t["idle"], drafted, nodes, acc, decoding)
        t["probe_batch"][drafted] = len(drafted)
        t.defaults(gain=self.bastion_estimates.engine_gain)  # for requests yet to come

    def _bastion_gate(self, eligible: np.ndarray, contexts: np.ndarray) -> np.ndarray:
        """Which requests draft this step: core.gating's rule under the 'auto'
        budget, every eligible request with a fixed budget, none when
        speculation is off. Identical on every TP rank (rank 0 decides)."""
        cfg = self.bastion_config
        budget = self._bastion_budget
        if cfg.drafting == "never" or not eligible.any():
            return np.zeros_like(eligible)
        if cfg.drafting == "always" or budget is None or not budget.ready or cfg.min_nodes > 0:
            return eligible.copy()
        t = self.bastion_table
        force = probes_due(eligible, t["idle"], t["probe_batch"],
                           cfg.reprobe_interval << t["backoff"])
        decision = budget.plan_drafting(t["gain"], t["nodes"], contexts, eligible, force)
        decision = _same_on_all_tp_ranks(torch.from_numpy(decision).long()).numpy().astype(bool)
        back_off_probes(t["backoff"], t["probed"], eligible, decision, force, cfg.reprobe_backoff)
        t["probed"][:] = force & decision
        t["depth"][force & decision] = cfg.draft_depth  # a re-probe drafts at full depth
        return decision

    def _bastion_get_backlog(self, aux_hidden_states) -> Backlog:
        if self._bastion_backlog is None:
            F = sum(h.shape[-1] for h in aux_hidden_states)
            self._bastion_backlog = Backlog(
                self.max_num_reqs, BACKLOG_TOKENS, F, aux_hidden_states[0].dtype, self.device)
        return self._bastion_backlog

    def _bastion_new_slot(self, slot: int) -> None:
        if self._bastion_backlog is not None:
            self._bastion_backlog.clear([slot])

    def take_draft_token_ids(self):
        out = super().take_draft_token_ids()
        if out is not None and self._bastion_pending is not None and self._bastion_structured:
            # the tree shape of structured-output requests' drafts, for their
            # grammar on the scheduler side (structured_trees.py)
            full, ids = self._bastion_pending
            rows = [i for i in np.nonzero(full.num_nodes.numpy() > 0)[0].tolist()
                    if (st := self.requests.get(ids[i])) is not None
                    and st.sampling_params is not None
                    and st.sampling_params.structured_outputs is not None]
            if rows:
                par = full.parents.tolist()
                setattr(out, PARENTS_ATTR, {
                    ids[i]: par[i][1 : 1 + int(full.num_nodes[i])] for i in rows})
        return out

    def _copy_draft_token_ids_to_cpu(self, scheduler_output, zeros_only: bool = False):
        if zeros_only:
            # vLLM zeroes drafts when the drafter cannot run (near max_model_len);
            # BASTION schedules no tree instead of a chain of zeros.
            self._draft_token_ids = [[] for _ in self.input_batch.req_ids]
            self._bastion_pending = None
        return super()._copy_draft_token_ids_to_cpu(scheduler_output, zeros_only=False)


def _scatter_trees(trees: TreeBatch, rows: np.ndarray, batch_size: int) -> TreeBatch:
    """Trees of the drafting requests placed at their batch rows; the other
    rows get empty trees (root only)."""
    if len(rows) == batch_size:
        return trees
    full = chain_tree([[] for _ in range(batch_size)])
    full = pad_trees(full, trees.width)
    idx = torch.from_numpy(rows)
    for k in TreeBatch.__dataclass_fields__:
        x = getattr(full, k)
        y = getattr(trees, k)
        if x is not None and y is not None:
            x[idx] = y
    return full


def _keep_nodes(trees: TreeBatch, kept: dict | None, req_ids: list[str]) -> TreeBatch:
    """`trees` restricted to the nodes the scheduler kept (request id ->
    1-based node indices; requests not in `kept` keep all their nodes)."""
    if not kept:
        return trees
    rows = [(i, kept[rid]) for i, rid in enumerate(req_ids) if rid in kept]
    if not rows:
        return trees
    keep = torch.ones(trees.tokens.shape, dtype=torch.bool)
    for i, cols in rows:
        keep[i, 1:] = False
        keep[i, [c for c in cols if c < trees.width]] = True
    return keep_columns(trees, keep)


def _with_chains(trees: TreeBatch, rows: np.ndarray, n: np.ndarray, drafts: np.ndarray) -> TreeBatch:
    """Replace the trees of `rows` by chains of their scheduled drafts (drafts
    of a request whose tree is gone, e.g. scheduled from an older step)."""
    chains = chain_tree([drafts[i, : n[i]].tolist() if rows[i] else [] for i in range(len(n))])
    return replace_rows(trees, torch.from_numpy(rows), chains)


def _same_on_all_tp_ranks(n: torch.Tensor) -> torch.Tensor:
    """Rank 0's node counts on every TP rank (budgets are timed per rank)."""
    try:
        from vllm.distributed import get_tp_group

        group = get_tp_group()
    except Exception:  # noqa: BLE001 - no distributed state: single process
        return n
    if group.world_size == 1:
        return n
    return group.broadcast(n.to(group.device), src=0).cpu()


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


class BastionGPUModelRunner(BastionRunnerMixin, GPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        self._bastion_init()


class BastionCPUModelRunner(BastionRunnerMixin, CPUModelRunner):
    def __init__(self, vllm_config, device):
        super().__init__(vllm_config, device)
        with _torch_cuda_wrapper():
            self._bastion_init()
