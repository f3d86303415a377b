"""Differential testing of BASTION against vLLM without speculation (offline tooling).

The machinery behind `scripts/difftest.py` and tests/test_e2e_lossless.py:

* prompts: generated token-id prompts of four kinds (code, prose, unicode,
  near max_model_len), deterministic per seed, as token ids so that the
  offline and the server paths see exactly the same input;
* engines: one vLLM engine per (pair, prefix caching, chunked prefill, tree
  setting); every engine generates every prompt at every batch size (the
  prompts submitted together in groups of that size), greedy and seeded;
* references: vLLM without speculation for greedy (with the top-2 log-probs
  of every emitted token, to classify divergences), and BASTION with
  `drafting: "never"` for seeded sampling (vLLM's own forward, no drafts
  ever; a seeded request is sampled with BASTION's keyed noise, which is
  not vLLM's per-request generator, so plain vLLM is no reference for the
  exact seeded tokens; tests/test_e2e_sampling.py checks the law);
* the server path: BASTION behind the OpenAI server with concurrent clients
  (as many as the batch size), compared with the offline reference;
* classification of every request: `none` (identical), `near-tie` (at the
  first divergence the reference's token beat the emitted one by at most
  `tie_bound` logit units: for greedy, the reference's top-1/top-2 log-prob
  margin; for seeded sampling, the smallest change of the reference's logits
  row that lets the emitted token win its exponential race, recomputed from
  the reference's top log-probs and BASTION's keyed noise: a race-score gap,
  or a token's top-k/top-p membership flipping), `other`. Every divergent
  request is listed (prompt, position, tokens, cause, margin) in its row.
  Near-ties are what bf16 rounding can flip: rows of a prefill chunk depend
  on where the chunk starts and ends, and with chunked prefill that depends
  on how many tokens the rest of the step takes (verify rows among them).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gc
import json
import math
import os
import random
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

CAUSES = ("none", "near-tie", "other")
KINDS = ("code", "prose", "unicode", "near-max")
# tree settings: name -> BASTION options (None: plain vLLM, no speculation)
TREES = {
    "topk1-fixed1": dict(topk=1, budget="fixed", max_nodes=1),
    "topk1-fixed15": dict(topk=1, budget="fixed", max_nodes=15),
    "topk1-fixed64": dict(topk=1, budget="fixed", max_nodes=64),
    "topk1-auto": dict(topk=1),
    "topk8-fixed1": dict(topk=8, budget="fixed", max_nodes=1),
    "topk8-fixed15": dict(topk=8, budget="fixed", max_nodes=15),
    "topk8-fixed64": dict(topk=8, budget="fixed", max_nodes=64),
    "topk8-auto": dict(topk=8),
}
NEVER = dict(drafting="never")
# the largest reference top-1/top-2 log-prob margin a divergence may sit at
# to count as a near-tie (bf16 logits of the shipped pair are multiples of
# 2**-4 .. 2**-2 at their magnitude; fp32 ones are exact to ~1e-6)
TIE_BOUND = {"bfloat16": 0.25, "float16": 0.25, "float32": 1e-3}


# ------------------------------------------------------------------ pairs


def resolve_pair(name: str, root: str | None = None) -> tuple[str, str, str]:
    """(target, drafter, dtype): 'shipped' (bf16) or 'tiny' (fp32, built
    from tests/tiny_models.py into `root`, default ~/.cache/vllm_bastion)."""
    if name == "shipped":
        from vllm_bastion.tools.benchmark import shipped_pair_paths

        t, d = shipped_pair_paths()
        return t, d, "bfloat16"
    if name == "tiny":
        root = root or os.path.join(os.path.expanduser("~"), ".cache", "vllm_bastion", "difftest-tiny")
        target, drafter = os.path.join(root, "target"), os.path.join(root, "drafter")
        if not os.path.isfile(os.path.join(drafter, "config.json")):
            tests = os.path.join(os.path.dirname(__file__), "..", "..", "tests")
            sys.path.insert(0, os.path.abspath(tests))
            from tiny_models import make_drafter, make_target

            make_target(target)
            make_drafter(target, drafter, block_size=8)
        return target, drafter, "float32"
    raise ValueError(f"unknown pair {name!r}: 'shipped' or 'tiny'")


# ------------------------------------------------------------------ prompts

_WORDS = ("the of and to in is was that for on with as by at from this which be are or an "
          "it not have had has but were their they one all been there more when can would "
          "river market winter garden letter window stone morning history question silver "
          "quietly because although whenever through between beneath without").split()
_IDENTS = "value item count index total result buffer node parent child key path line text".split()
_UNICODE = ("été naïve façade Ærø smörgåsbord Straße Ελληνικά язык Україна 日本語の文章 中文字符 "
            "한국어 문장 עברית العربية हिन्दी ไทย ✓ ✗ → ← ∑ ∫ √ ∞ ≠ ≤ ≥ 😀 🚀 🎉 👍🏽 🇫🇷 "
            "e\u0301 n\u0303 \u200b \u00a0 ½ ¾ № ™ © ® « » „ “ ” ‘ ’ — – …").split()


def _code(rng: random.Random) -> str:
    out = []
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(_IDENTS) + "_" + rng.choice(_IDENTS)
        args = ", ".join(rng.sample(_IDENTS, rng.randint(0, 3)))
        body = []
        for _ in range(rng.randint(1, 5)):
            a, b = rng.sample(_IDENTS, 2)
            body.append(rng.choice([f"    {a} = {b} + {rng.randint(0, 99)}",
                                    f"    if {a} > {b}:\n        return {a}",
                                    f"    for {a} in range(len({b})):\n        {b}[{a}] += 1",
                                    f"    {a}.append({b}[{rng.randint(0, 9)}])"]))
        out.append(f"def {name}({args}):\n" + "\n".join(body) + "\n")
    return "\n".join(out) + rng.choice(["\n\ndef ", "\nclass ", "\n    return ", "\nif __name__"])


def _prose(rng: random.Random) -> str:
    sents = []
    for _ in range(rng.randint(1, 6)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 18))]
        sents.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!", ","]))
    return " ".join(sents)


def _unicode(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(3, 30)):
        parts.append(rng.choice(_UNICODE) if rng.random() < 0.6 else rng.choice(_WORDS))
    return rng.choice([" ", "", "\n"]).join(parts)


@dataclasses.dataclass
class Prompt:
    kind: str
    token_ids: list[int]


def make_prompts(target: str, n: int, *, seed: int = 0, max_model_len: int = 1024,
                 max_tokens: int = 32) -> list[Prompt]:
    """`n` prompts: 40% code, 25% prose, 20% unicode, 15% near max_model_len
    (prompt + max_tokens within 8 tokens of max_model_len)."""
    from transformers import AutoTokenizer

    from vllm_bastion.tools.benchmark import heldout_prompts

    tok = AutoTokenizer.from_pretrained(target)
    rng = random.Random(seed)
    try:
        corpus = heldout_prompts(target, 64)
    except OSError:
        corpus = []
    kinds = ["code"] * 8 + ["prose"] * 5 + ["unicode"] * 4 + ["near-max"] * 3
    out: list[Prompt] = []
    long_ids = tok.encode("\n".join(corpus + [_code(rng) for _ in range(200)]), add_special_tokens=False)
    for i in range(n):
        kind = kinds[i % len(kinds)]
        if kind == "code":
            text = rng.choice(corpus) if corpus and rng.random() < 0.4 else _code(rng)
        elif kind == "prose":
            text = _prose(rng)
        elif kind == "unicode":
            text = _unicode(rng)
        else:
            length = max_model_len - max_tokens - rng.randint(0, 8)
            start = rng.randint(0, max(0, len(long_ids) - length))
            ids = (long_ids * (1 + length // max(1, len(long_ids))))[start:start + length]
            out.append(Prompt(kind, ids[:length]))
            continue
        ids = tok.encode(text, add_special_tokens=False) or [tok.eos_token_id or 0]
        out.append(Prompt(kind, ids[: max_model_len - max_tokens - 1]))
    return out


# ------------------------------------------------------------------ engines


@dataclasses.dataclass(frozen=True)
class EngineSpec:
    pair: str
    prefix_caching: bool
    chunked_prefill: bool
    tree: str | None  # a TREES key, "never" (BASTION, no drafting) or None (no speculation)
    eager: bool = False
    max_model_len: int = 1024
    max_num_seqs: int = 64

    @property
    def label(self) -> str:
        t = self.tree or "no-spec"
        return (f"{self.pair}/{t}/prefix-{'on' if self.prefix_caching else 'off'}"
                f"/chunked-{'on' if self.chunked_prefill else 'off'}")

    def engine_kwargs(self, target: str, drafter: str, dtype: str) -> dict:
        kw = dict(model=target, dtype=dtype, max_model_len=self.max_model_len, seed=0,
                  max_num_seqs=self.max_num_seqs, enforce_eager=self.eager,
                  max_logprobs=RACE_LOGPROBS,
                  enable_prefix_caching=self.prefix_caching,
                  enable_chunked_prefill=self.chunked_prefill,
                  # chunked: a small budget, so long prompts are prefilled in
                  # chunks next to decoding requests; otherwise whole prompts
                  max_num_batched_tokens=256 if self.chunked_prefill else max(2048, self.max_model_len))
        if self.tree is not None:
            opts = NEVER if self.tree == "never" else TREES[self.tree]
            kw["speculative_config"] = {"method": "bastion", "model": drafter, **opts}
        return kw


# seeded sampling: every request's parameters; its seed is SEED_BASE + its index
SEEDED = dict(temperature=0.8, top_p=0.9, top_k=20)
SEED_BASE = 1000
# log-probs a seeded reference records per position: more than top_k, so that
# tokens tied with the k-th (vLLM's top-k keeps them all) are seen; engines
# running references allow this many (vLLM's default max_logprobs is 20)
RACE_LOGPROBS = SEEDED["top_k"] + 8


def sampling_params(mode: str, max_tokens: int, index: int, *, logprobs: int | None = None):
    from vllm import SamplingParams

    if mode == "greedy":
        return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                              logprobs=logprobs)
    return SamplingParams(**SEEDED, seed=SEED_BASE + index, max_tokens=max_tokens,
                          ignore_eos=True, logprobs=logprobs)


def request_body(mode: str, max_tokens: int, index: int) -> dict:
    body = {"max_tokens": max_tokens, "ignore_eos": True, "return_token_ids": True}
    if mode == "greedy":
        return {**body, "temperature": 0.0}
    return {**body, **SEEDED, "seed": SEED_BASE + index}


@dataclasses.dataclass(frozen=True)
class Race:
    """One generated position of a seeded reference's race.

    `scores`: race score (logit units, T * log(p / E) up to a constant) of
    every recorded token, also of those top-k/top-p left out; `running`: the
    tokens the race ran (kept, or undecided); `undecided`: tied tokens at the
    top-p cut (kept or not by the order of equal logits); `flip`: per token,
    the size of a logits change (in the same units as a score gap: a row off
    by d in every entry moves a gap by at most 2d) that would flip whether it
    runs: for a kept token, what drops it (top-k: a token below must pass it;
    top-p: the log-odds of the mass up to it, scaled by T, must fall to the
    cut's), for a left-out token what lets it in; 0 for undecided tokens."""

    scores: dict[int, float]
    running: frozenset[int]
    undecided: frozenset[int]
    flip: dict[int, float]

    def explanation(self, token: int) -> float | None:
        """The smallest change of the reference's logits row (score-gap units)
        that any one condition for `token` to win needs: `token` runs, and
        every running token that beat it falls behind or drops out. A lower
        bound on what explains a run emitting `token`; None if `token` was
        not recorded."""
        if token not in self.scores:
            return None
        mine = self.scores[token]
        cost = 0.0 if token in self.running else self.flip[token]
        for o in self.running:
            if o != token and self.scores[o] > mine:
                cost = max(cost, min(self.scores[o] - mine, self.flip[o]))
        return cost


def _log_odds(x: float) -> float:
    return math.log(x) - math.log1p(-x) if x < 1 else math.inf


def race_at(lp: dict[int, float], *, seed: int, position: int, temperature: float,
            top_p: float, top_k: int) -> Race | None:
    """The race of one position from the recorded raw log-probs `lp` (token
    id -> log-prob), by vLLM's rules: top-k keeps every token tied with the
    k-th largest; top-p sorts the kept ones ascending and drops those whose
    cumulative probability (at temperature T) is at most 1 - top_p, keeping at
    least the largest. None where the recorded log-probs cannot tell the top-k
    set (every recorded token ties the k-th)."""
    import torch

    from vllm_bastion.core.noise import seeded_exponential

    desc = sorted(lp.values(), reverse=True)
    kth = desc[min(top_k, len(desc)) - 1]
    if len(lp) >= RACE_LOGPROBS and desc[-1] >= kth:
        return None
    flip: dict[int, float] = {}
    for i, v in lp.items():  # top-k: the k-th largest of the others must pass i (or i pass it)
        others = list(desc)
        others.remove(v)
        kth_other = others[top_k - 1] if len(others) >= top_k else -math.inf
        flip[i] = max(0.0, v - kth_other) if v >= kth else kth - v
    values = sorted({v for v in lp.values() if v >= kth})  # ascending, one per tie group
    group = [[i for i in lp if lp[i] == v] for v in values]
    x = torch.tensor(values, dtype=torch.float64) / temperature
    n = torch.tensor([len(g) for g in group], dtype=torch.float64)
    prob = torch.exp(x - torch.logsumexp(x + n.log(), 0))  # one member's probability
    before = torch.cumsum(n * prob, 0) - n * prob  # cumulative probability below the group
    cut = 1 - top_p
    # members (in the sorted order, 1-based r) dropped: before + r * prob <= cut
    dropped = ((cut - before) / prob).floor().clamp(0) if top_p < 1 else 0 * n
    dropped[-1] = torch.clamp(dropped[-1], max=n[-1] - 1)  # vLLM keeps at least one
    running, undecided = set(), set()
    for g, d, b, p, m in zip(group, dropped.tolist(), before.tolist(), prob.tolist(), n.tolist()):
        if 0 < d < len(g):
            undecided.update(g)
            flip.update({i: 0.0 for i in g})
            running.update(g)
        elif d >= len(g):  # all dropped by top-p: the most mass up to one of them must pass the cut
            flip.update({i: temperature * (_log_odds(cut) - _log_odds(b + m * p)) for i in g})
        else:
            running.update(g)
            if top_p < 1 and not (g is group[-1] and len(g) == 1):  # the largest always stays
                out = temperature * (_log_odds(b + p) - _log_odds(cut))
                flip.update({i: min(flip[i], out) for i in g})
    e = seeded_exponential(torch.tensor([seed]), torch.tensor([position]), max(lp) + 1)[0].double()
    scores = {i: v - temperature * math.log(e[i]) for i, v in lp.items()}
    return Race(scores, frozenset(running), frozenset(undecided), flip)


@dataclasses.dataclass
class SeededRace:
    """What a seeded reference request's exponential race was at each
    generated position: the raw log-probs of its top tokens (more than top-k,
    see RACE_LOGPROBS) and the keys of BASTION's noise (sampling.py), from
    which every runner's race is recomputed exactly (`race_at`)."""

    seed: int
    start: int  # absolute position of the first generated token (the prompt length)
    logprobs: list[dict[int, float]]  # per generated position: token id -> raw log-prob
    temperature: float = SEEDED["temperature"]
    top_p: float = SEEDED["top_p"]
    top_k: int = SEEDED["top_k"]
    _races: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def race(self, j: int) -> Race | None:
        if j not in self._races:
            self._races[j] = race_at(self.logprobs[j], seed=self.seed, position=self.start + j,
                                     temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return self._races[j]

    def scores(self, j: int) -> dict[int, float] | None:
        """Race scores at generated position j of the tokens that ran (kept by
        top-k and top-p, or undecided); None where the top-k set is unknown."""
        race = self.race(j)
        return None if race is None else {i: race.scores[i] for i in race.running}

    def undecided(self, j: int) -> frozenset[int]:
        """The tokens that top-p may or may not drop: tied tokens straddling
        its cut, whose order (torch's CPU sort is not stable) decides which of
        them stay."""
        race = self.race(j)
        return frozenset() if race is None else race.undecided

    def winner(self, j: int) -> int | None:
        """The token the race picks; None where that depends on the order of
        tied tokens at the top-p cut, or the top-k set is unknown."""
        scores = self.scores(j)
        if scores is None:
            return None
        best = max(scores, key=scores.get)
        return None if best in self.undecided(j) else best


@dataclasses.dataclass
class Output:
    tokens: list[int]
    top2: list[tuple[float, float]] | None = None  # reference greedy: top-1/top-2 log-probs
    race: SeededRace | None = None  # reference seeded: the race at every position


def _top2(logprobs) -> list[tuple[float, float]] | None:
    if not logprobs:
        return None
    out = []
    for lp in logprobs:
        vals = sorted((v.logprob for v in lp.values()), reverse=True)
        out.append((vals[0], vals[1] if len(vals) > 1 else -math.inf))
    return out


def _output(mode: str, index: int, prompt: Prompt, completion) -> Output:
    tokens, lps = list(completion.token_ids), completion.logprobs
    if mode == "greedy" or not lps:
        return Output(tokens, _top2(lps))
    race = SeededRace(SEED_BASE + index, len(prompt.token_ids),
                      [{t: v.logprob for t, v in lp.items() if v.logprob > -math.inf} for lp in lps])
    return Output(tokens, race=race)


def run_offline(llm, prompts: list[Prompt], mode: str, batch_size: int, max_tokens: int,
                *, logprobs: bool = False) -> list[Output]:
    """Generate every prompt, `batch_size` requests submitted together; with
    `logprobs`, what classifies a divergence from this run (top-2 log-probs
    for greedy, the race for seeded)."""
    from vllm import TokensPrompt

    n_lp = (2 if mode == "greedy" else RACE_LOGPROBS) if logprobs else None
    outs: list[Output] = []
    for i in range(0, len(prompts), batch_size):
        group = prompts[i : i + batch_size]
        sps = [sampling_params(mode, max_tokens, i + j, logprobs=n_lp) for j in range(len(group))]
        res = llm.generate([TokensPrompt(prompt_token_ids=p.token_ids) for p in group], sps,
                           use_tqdm=False)
        outs += [_output(mode, i + j, p, r.outputs[0]) for j, (p, r) in enumerate(zip(group, res))]
    return outs


def run_server(url: str, model: str, prompts: list[Prompt], mode: str, concurrency: int,
               max_tokens: int) -> list[Output]:
    """Every prompt through /v1/completions, `concurrency` clients at once."""
    import requests

    def one(i):
        body = {"model": model, "prompt": prompts[i].token_ids, **request_body(mode, max_tokens, i)}
        r = requests.post(url + "/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        ch = r.json()["choices"][0]
        return Output(list(ch.get("token_ids") or []))

    with concurrent.futures.ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, range(len(prompts))))


# ------------------------------------------------------------------ classification


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for j, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return j
    return None if len(a) == len(b) else min(len(a), len(b))


def classify(ref: Output, got: Output, bound: float) -> tuple[str, float | None]:
    """(cause, margin) of `got` against the reference at the first divergence,
    in logit units, so that one bound holds for greedy and seeded (a logits
    row off by d in every entry moves either margin by at most 2d): greedy,
    the reference's top-1/top-2 log-prob difference; seeded, the smallest
    change of the reference's row that lets `got`'s token win its race
    (`Race.explanation`: race-score gaps, or flipping a token's top-k/top-p
    membership). None where no margin is known (no logprobs recorded, or
    `got`'s token not among the reference's recorded tokens)."""
    j = first_divergence(ref.tokens, got.tokens)
    if j is None:
        return "none", None
    if ref.top2 is not None and j < len(ref.top2):
        a, b = ref.top2[j]
        margin = a - b
        return ("near-tie" if margin <= bound else "other"), margin
    if ref.race is not None and j < min(len(ref.race.logprobs), len(got.tokens)):
        race = ref.race.race(j)
        margin = None if race is None else race.explanation(got.tokens[j])
        if margin is not None:
            return ("near-tie" if margin <= bound else "other"), margin
    return "other", None


@dataclasses.dataclass
class Row:
    engine: str
    interface: str  # offline | server
    mode: str
    batch_size: int
    counts: dict
    margins: list  # margins of the near-ties and others
    kinds_other: dict  # prompt kind -> number of "other"
    seconds: float
    # every divergent request: prompt index and kind, first divergent
    # position, the reference's and the run's token there, cause, margin
    divergences: list = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def compare(engine: str, interface: str, mode: str, batch_size: int, prompts: list[Prompt],
            refs: list[Output], got: list[Output], bound: float, seconds: float) -> Row:
    counts = {c: 0 for c in CAUSES}
    margins, other, divergences = [], {}, []
    for i, (p, r, g) in enumerate(zip(prompts, refs, got)):
        cause, margin = classify(r, g, bound)
        counts[cause] += 1
        if margin is not None:
            margins.append(round(margin, 6))
        if cause == "other":
            other[p.kind] = other.get(p.kind, 0) + 1
        if cause != "none":
            j = first_divergence(r.tokens, g.tokens)
            divergences.append(dict(prompt=i, kind=p.kind, position=j, cause=cause,
                                    margin=None if margin is None else round(margin, 6),
                                    ref=r.tokens[j] if j < len(r.tokens) else None,
                                    got=g.tokens[j] if j < len(g.tokens) else None))
    return Row(engine, interface, mode, batch_size, counts, margins, other, seconds, divergences)


# ------------------------------------------------------------------ the matrix


@dataclasses.dataclass
class Matrix:
    pairs: tuple[str, ...] = ("shipped", "tiny")
    trees: tuple[str, ...] = tuple(TREES)
    batch_sizes: tuple[int, ...] = (1, 4, 16, 64)
    prefix_caching: tuple[bool, ...] = (True, False)
    chunked_prefill: tuple[bool, ...] = (True, False)
    modes: tuple[str, ...] = ("greedy", "seeded")
    interfaces: tuple[str, ...] = ("offline", "server")
    server_trees: tuple[str, ...] | None = None  # tree settings also run through the server
    num_prompts: int = 200
    max_tokens: int = 32
    max_model_len: int = 1024
    eager: bool = False
    seed: int = 0


def _engine(spec: EngineSpec, target: str, drafter: str, dtype: str):
    from vllm import LLM

    return LLM(**spec.engine_kwargs(target, drafter, dtype))


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


def _server_args(spec: EngineSpec, dtype: str, drafter: str) -> list[str]:
    kw = spec.engine_kwargs("", drafter, dtype)
    args = ["--dtype", dtype, "--max-model-len", str(spec.max_model_len), "--seed", "0",
            "--max-num-seqs", str(spec.max_num_seqs),
            "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
            "--enable-prefix-caching" if spec.prefix_caching else "--no-enable-prefix-caching",
            "--enable-chunked-prefill" if spec.chunked_prefill else "--no-enable-chunked-prefill"]
    if spec.eager:
        args.append("--enforce-eager")
    if "speculative_config" in kw:
        args += ["--speculative-config", json.dumps(kw["speculative_config"])]
    return args


def run_matrix(m: Matrix, log=print, on_row=None) -> list[Row]:
    """Run the matrix; returns one Row per (engine, interface, mode, batch)."""
    rows: list[Row] = []
    for pair in m.pairs:
        target, drafter, dtype = resolve_pair(pair)
        bound = TIE_BOUND[dtype]
        prompts = make_prompts(target, m.num_prompts, seed=m.seed, max_model_len=m.max_model_len,
                               max_tokens=m.max_tokens)
        for prefix in m.prefix_caching:
            for chunked in m.chunked_prefill:
                base = dict(pair=pair, prefix_caching=prefix, chunked_prefill=chunked,
                            eager=m.eager, max_model_len=m.max_model_len)
                refs: dict[tuple[str, int], list[Output]] = {}
                # references: no speculation (greedy), BASTION never drafting (seeded)
                for tree, modes in ((None, ("greedy",)), ("never", ("seeded",))):
                    modes = [x for x in modes if x in m.modes]
                    if not modes:
                        continue
                    spec = EngineSpec(tree=tree, **base)
                    t0 = time.time()
                    llm = _engine(spec, target, drafter, dtype)
                    log(f"[difftest] reference {spec.label}: engine up in {time.time() - t0:.0f}s")
                    try:
                        for mode in modes:
                            for b in m.batch_sizes:
                                refs[(mode, b)] = run_offline(llm, prompts, mode, b, m.max_tokens,
                                                              logprobs=True)
                    finally:
                        _shutdown(llm)
                rows += _batch_variance_rows(m, base, prompts, refs, bound, log, on_row)
                for tree in m.trees:
                    spec = EngineSpec(tree=tree, **base)
                    t0 = time.time()
                    llm = _engine(spec, target, drafter, dtype)
                    log(f"[difftest] {spec.label}: engine up in {time.time() - t0:.0f}s")
                    try:
                        for mode in m.modes:
                            for b in m.batch_sizes:
                                t1 = time.time()
                                got = run_offline(llm, prompts, mode, b, m.max_tokens)
                                row = compare(spec.label, "offline", mode, b, prompts,
                                              refs[(mode, b)], got, bound, time.time() - t1)
                                rows.append(row)
                                log(_row_line(row))
                                if on_row:
                                    on_row(row)
                    finally:
                        _shutdown(llm)
                    if "server" in m.interfaces and (m.server_trees is None or tree in m.server_trees):
                        rows += _server_rows(m, spec, target, drafter, dtype, prompts, refs, bound,
                                             log, on_row)
    return rows


def _batch_variance_rows(m, base, prompts, refs, bound, log, on_row) -> list[Row]:
    """vLLM's own batch variance, for scale: each reference at every batch
    size against itself at the first one (interface "vs b<first>"; not
    BASTION's mismatches, so not counted by `bastion_other`)."""
    out = []
    b0 = m.batch_sizes[0]
    for mode, tree in (("greedy", None), ("seeded", "never")):
        label = EngineSpec(tree=tree, **base).label
        for b in m.batch_sizes[1:]:
            if (mode, b) not in refs or (mode, b0) not in refs:
                continue
            row = compare(label, f"vs b{b0}", mode, b, prompts, refs[(mode, b0)], refs[(mode, b)],
                          bound, 0.0)
            out.append(row)
            log(_row_line(row))
            if on_row:
                on_row(row)
    return out


def _is_variance(interface: str) -> bool:
    """A row of `_batch_variance_rows` (vLLM against itself), not BASTION's."""
    return interface.startswith("vs ")


def bastion_other(rows: list[Row]) -> int:
    """'other' mismatches of BASTION against its references (the exit status)."""
    return sum(r.counts["other"] for r in rows if not _is_variance(r.interface))


def _server_rows(m, spec, target, drafter, dtype, prompts, refs, bound, log, on_row):
    import tempfile

    from vllm_bastion.launch import openai_server

    out = []
    log_path = os.path.join(tempfile.mkdtemp(prefix="difftest-"), "server.log")
    t0 = time.time()
    env = dict(os.environ)
    with openai_server(target, _server_args(spec, dtype, drafter), log_path, env=env,
                       timeout_s=1200) as url:
        log(f"[difftest] server {spec.label}: up in {time.time() - t0:.0f}s (log {log_path})")
        for mode in m.modes:
            for b in m.batch_sizes:
                t1 = time.time()
                got = run_server(url, target, prompts, mode, b, m.max_tokens)
                # concurrent clients interleave arbitrarily: the reference is
                # the offline run whose batches were equally large
                row = compare(spec.label, "server", mode, b, prompts, refs[(mode, b)], got, bound,
                              time.time() - t1)
                out.append(row)
                log(_row_line(row))
                if on_row:
                    on_row(row)
    return out


def _row_line(r: Row) -> str:
    c = r.counts
    worst = max(r.margins) if r.margins else None
    return (f"  {r.engine:<48} {r.interface:<7} {r.mode:<6} batch {r.batch_size:>3}: "
            f"none {c['none']:>4}  near-tie {c['near-tie']:>3}  other {c['other']:>3}"
            + (f"  (largest margin {worst:.4g})" if worst is not None else "")
            + f"  [{r.seconds:.0f}s]")


def format_table(rows: list[Row]) -> str:
    """Mismatches by cause, per engine/interface/mode, summed over batch sizes."""
    agg: dict[tuple, dict] = {}
    for r in rows:
        k = (r.engine, r.interface, r.mode)
        a = agg.setdefault(k, {c: 0 for c in CAUSES} | {"batches": [], "margins": []})
        for c in CAUSES:
            a[c] += r.counts[c]
        a["batches"].append(r.batch_size)
        a["margins"] += [x for x in r.margins]
    lines = [f"{'engine':<48} {'iface':<7} {'mode':<6} {'batches':<12} {'none':>6} {'near-tie':>8} "
             f"{'other':>6} {'max tie margin':>14}"]
    tot = {c: 0 for c in CAUSES}
    for (e, i, md), a in agg.items():
        for c in CAUSES:
            tot[c] += 0 if _is_variance(i) else a[c]
        ties = [x for x in a["margins"]]
        lines.append(f"{e:<48} {i:<7} {md:<6} {','.join(map(str, a['batches'])):<12} {a['none']:>6} "
                     f"{a['near-tie']:>8} {a['other']:>6} "
                     f"{(max(ties) if ties else float('nan')):>14.4g}")
    lines.append(f"{'TOTAL (BASTION)':<48} {'':<7} {'':<6} {'':<12} {tot['none']:>6} {tot['near-tie']:>8} "
                 f"{tot['other']:>6}")
    return "\n".join(lines)
