"""Learned per-layer KV budgets (EvolKV-style): CMA-ES over the share of a fixed token
budget each layer keeps, scored on the operator's own prompts. ``kvrelay calibrate``.

    prompts ──full prefill──► per layer: K, V [P, Hkv, D], SnapKV order [Hkv, P]
            ──full greedy──►  target continuation t_1..t_T and its full-KV log-probs
    candidate weights x ∈ R^L ──layer_budgets(keep, exp(x))──► per layer b_l tokens
            ──teacher-forced forward of the T targets on the kept tokens only──►
            objective = mean over prompts and positions of KL(full ‖ compressed)

Why this objective. The task answer is not needed (an operator's traffic has no labels):
the compressed cache should make the model say what it says on full KV, and the KL of
the next-token distributions along the full-KV continuation measures exactly that, as a
smooth number (accuracy on a few dozen prompts is too coarse for a 30-dimensional
search). The first token is sampled on full KV by the prefill worker, as in serving.

What is the same as serving: the model code, the post-RoPE keys of a full prefill,
SnapKV's scores and per-KV-head top-k (``kv_selection.window_scores``, the same stable
order ``select_layer`` uses), the per-layer counts (``kv_selection.layer_budgets`` with
the sinks and window forced), the decode at the true positions. What differs: the whole
prompt is the shipped region (the decode side holds nothing), the kept KV stays exact
(the quantization's noise is not part of the search), and attention masks the dropped
entries instead of compacting them (tests/unit/test_compacted_decode.py shows the two are
the same computation).

The search: x_l = log weight of layer l, x0 = 0 (uniform), CMA-ES (the ``cma``
package) in [-bound, bound]^L at the fixed total round(keep · P · L) per prompt, for at
most ``max_evals`` candidates or ``time_limit_s`` seconds. The profile written is the
best candidate seen; uniform and pyramid are scored on the same prompts for comparison.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from workers import kv_selection
from workers.model.llama import LlamaForCausalLM


@dataclass(frozen=True)
class CalibrationSettings:
    keep: tuple[float, ...] = (0.25,)  # keep fractions the objective averages over
    target_tokens: int = 16            # T: the full-KV continuation scored per prompt
    window: int = 32
    sinks: int = 4
    kernel: int = 63
    pooling: str = "avg"
    max_evals: int = 240               # CMA-ES candidates, at most
    time_limit_s: float = 900.0        # and at most this long (the baselines are extra)
    sigma0: float = 0.5
    bound: float = 2.5                 # |log weight| <= bound: weights within e^±2.5 of each other
    popsize: int | None = None         # None: CMA-ES's default 4 + 3 ln L
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.keep or any(not 0 < k <= 1 for k in self.keep):
            raise ValueError(f"keep fractions must be in (0, 1], got {self.keep}")
        if self.target_tokens < 1 or self.max_evals < 1 or self.time_limit_s <= 0:
            raise ValueError("target_tokens and max_evals must be >= 1, time_limit_s > 0")

    @property
    def selection(self) -> kv_selection.SelectionParams:
        return kv_selection.SelectionParams(self.window, self.sinks, self.kernel, self.pooling)


@dataclass
class PromptState:
    """One calibration prompt, prefilled in full."""

    prompt_len: int
    keys: list[torch.Tensor]    # per layer [P, Hkv, D] post-RoPE
    values: list[torch.Tensor]  # per layer [P, Hkv, D]
    order: list[torch.Tensor]   # per layer [Hkv, P] int64: SnapKV's keep order (forced first)
    feed: torch.Tensor          # [T] int64: first token, t_1 .. t_{T-1} (teacher forcing input)
    full_logp: torch.Tensor     # [T, V] float32: log-probs of the next token on full KV
    forced: int                 # tokens always kept (sinks + window)


@dataclass
class CalibrationResult:
    weights: list[float]
    objective: float                  # best candidate's mean KL
    baselines: dict[str, float]       # uniform / pyramid on the same prompts
    evaluations: int
    seconds: float
    history: list[float] = field(default_factory=list)  # best-so-far after each generation


class _DensePlan:
    """Causal attention over everything fed so far, optionally with a per-layer keep mask
    over the prompt entries: [Hkv, P] bool. Keeps K/V per layer (the prefill's capture)."""

    def __init__(self, num_heads: int, masks: list[torch.Tensor] | None = None,
                 keys: list[torch.Tensor] | None = None, values: list[torch.Tensor] | None = None) -> None:
        self.num_heads = num_heads
        self.masks = masks
        self.k: dict[int, torch.Tensor] = dict(enumerate(keys)) if keys is not None else {}
        self.v: dict[int, torch.Tensor] = dict(enumerate(values)) if values is not None else {}

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t = q.shape[0]                                            # q [T, Hq, D]; k, v [T, Hkv, D]
        past_k, past_v = self.k.get(layer), self.v.get(layer)
        keys = k if past_k is None else torch.cat([past_k, k])    # [L, Hkv, D]
        vals = v if past_v is None else torch.cat([past_v, v])
        if self.masks is None:  # capture (prefill / full decode): keep what was fed
            self.k[layer], self.v[layer] = keys, vals
        hkv = keys.shape[1]
        group = self.num_heads // hkv
        qh = q.permute(1, 0, 2)                                   # [Hq, T, D]
        kh = keys.permute(1, 0, 2)                                # [Hkv, L, D] (query head h -> kv h // G)
        vh = vals.permute(1, 0, 2)
        if self.masks is None and past_k is None:                 # the prefill: plain causal
            out = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True)
        else:
            n = keys.shape[0]
            allowed = torch.ones(hkv, t, n, dtype=torch.bool).tril_(n - t)  # causal over the new tokens
            if self.masks is not None:
                p = self.masks[layer].shape[1]
                allowed[:, :, :p] &= self.masks[layer][:, None, :]
            out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed.repeat_interleave(group, 0),
                                                 enable_gqa=True)
        return out.permute(1, 0, 2)                               # [T, Hq, D]


def prepare(model: LlamaForCausalLM, prompt: list[int], settings: CalibrationSettings,
            eos_token_id: int | None = None) -> PromptState:
    """Full prefill, SnapKV orders, the full-KV greedy continuation and its log-probs."""
    cfg = model.config
    sel = settings.selection
    p = len(prompt)
    w = min(sel.window, p)
    plan = _DensePlan(cfg.num_heads)
    qwin: dict[int, torch.Tensor] = {}
    hidden = model(torch.tensor(prompt), torch.arange(p), plan, lambda i, q: qwin.__setitem__(i, q[-w:].clone()))
    keys = [plan.k[i][:p].clone() for i in range(cfg.num_layers)]
    values = [plan.v[i][:p].clone() for i in range(cfg.num_layers)]
    order = []
    for i in range(cfg.num_layers):
        scores, _ = kv_selection.window_scores(qwin[i], keys[i], sel)
        order.append(torch.sort(scores, dim=1, descending=True, stable=True).indices)
    feed = [int(model.compute_logits(hidden[-1:])[0].argmax())]  # the prefill worker's first token
    while len(feed) < settings.target_tokens and feed[-1] != eos_token_id:
        h = model(torch.tensor(feed[-1:]), torch.tensor([p + len(feed) - 1]), plan)
        feed.append(int(model.compute_logits(h)[0].argmax()))
    feed_t = torch.tensor(feed)
    full = _teacher_forced(model, p, keys, values, None, feed_t)
    return PromptState(p, keys, values, order, feed_t, full, kv_selection.forced_count(p, 0, sel))


def _teacher_forced(model: LlamaForCausalLM, p: int, keys, values, masks, feed: torch.Tensor) -> torch.Tensor:
    plan = _DensePlan(model.config.num_heads, masks, keys, values)
    hidden = model(feed, torch.arange(p, p + len(feed)), plan)
    return torch.log_softmax(model.compute_logits(hidden), dim=-1)  # [T, V]


def masks_for(state: PromptState, budgets: Sequence[int]) -> list[torch.Tensor]:
    """Per layer [Hkv, P] bool: the top-b_l of SnapKV's order per KV head (as select_layer)."""
    out = []
    for order, b in zip(state.order, budgets):
        m = torch.zeros(order.shape, dtype=torch.bool)
        m.scatter_(1, order[:, :b], True)
        out.append(m)
    return out


def divergence(model: LlamaForCausalLM, state: PromptState, budgets: Sequence[int]) -> float:
    """Mean over the T positions of KL(full ‖ compressed) of the next-token distribution."""
    logp = _teacher_forced(model, state.prompt_len, state.keys, state.values, masks_for(state, budgets), state.feed)
    kl = (state.full_logp.exp() * (state.full_logp - logp)).sum(dim=-1)
    return float(kl.mean())


def budgets_for(state: PromptState, keep: float, weights) -> list[int]:
    return kv_selection.layer_budgets(state.prompt_len, keep, len(state.keys), weights, min_tokens=state.forced)


def objective(model: LlamaForCausalLM, states: list[PromptState], keeps: Sequence[float], weights) -> float:
    return sum(divergence(model, s, budgets_for(s, k, weights)) for s in states for k in keeps) / (len(states) * len(keeps))


def calibrate(model: LlamaForCausalLM, states: list[PromptState], settings: CalibrationSettings,
              progress: Callable[[int, float], None] | None = None) -> CalibrationResult:
    """CMA-ES over log-weights; ``progress(evaluations, best)`` after each candidate."""
    import cma

    t0 = time.monotonic()
    layers = len(states[0].keys)
    keeps = settings.keep
    baselines = {name: objective(model, states, keeps, name) for name in ("uniform", "pyramid")}
    opts = {"bounds": [-settings.bound, settings.bound], "seed": settings.seed + 1, "verbose": -9}
    if settings.popsize:
        opts["popsize"] = settings.popsize
    es = cma.CMAEvolutionStrategy([0.0] * layers, settings.sigma0, opts)
    best_x, best_f = [0.0] * layers, baselines["uniform"]
    evals, history = 0, []
    deadline = time.monotonic() + settings.time_limit_s
    while not es.stop() and evals < settings.max_evals and time.monotonic() < deadline:
        xs = es.ask()
        fs = []
        for x in xs:
            if evals >= settings.max_evals or time.monotonic() >= deadline:
                break
            f = objective(model, states, keeps, [math.exp(v) for v in x])
            fs.append(f)
            evals += 1
            if f < best_f:
                best_x, best_f = list(map(float, x)), f
            if progress is not None:
                progress(evals, best_f)
        if len(fs) < len(xs):  # out of evaluations or time mid-generation: no partial tell
            break
        es.tell(xs, fs)
        history.append(best_f)
    weights = [math.exp(v) for v in best_x]
    mean = sum(weights) / layers
    return CalibrationResult([round(w / mean, 4) for w in weights], best_f, baselines, evals,
                             time.monotonic() - t0, history)


def write_profile(path: Path, model_name: str, result: CalibrationResult, settings: CalibrationSettings,
                  num_prompts: int, mean_prompt_len: float, note: str = "") -> None:
    """The profile JSON (``kv_selection.load_profile`` reads model / num_layers / weights)."""
    data = {
        "model": model_name,
        "num_layers": len(result.weights),
        "weights": result.weights,
        "note": note or "learned by kvrelay calibrate (CMA-ES, KL to full KV along the full-KV continuation)",
        "calibration": {
            "keep": list(settings.keep), "target_tokens": settings.target_tokens, "window": settings.window,
            "sinks": settings.sinks, "kernel": settings.kernel, "pooling": settings.pooling,
            "prompts": num_prompts, "mean_prompt_tokens": round(mean_prompt_len, 1),
            "evaluations": result.evaluations, "seconds": round(result.seconds, 1), "seed": settings.seed,
            "objective": {"learned": round(result.objective, 5),
                          **{k: round(v, 5) for k, v in result.baselines.items()}},
            "history": [round(h, 5) for h in result.history],
        },
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")
