"""SnapKV-style sparse selection of prompt tokens, per-layer budgets, and a quality guard.

After a FULL-attention prefill (never pruned during prefill) each layer's K/V is in the cache;
`select_layer` picks, per KV head, which prompt tokens of the *region* to ship to the decode worker::

    position  0      sinks                region_start                     P-w           P
              [sinks]........held.........|..........scored picks..........[###window###]
              |<--- receiver holds ------>|<------------- region: shipped -------------->|
    forced (always kept when inside the region): the first `sinks` tokens and the window.

Algorithm (SnapKV, Li et al. 2024, as implemented in NVIDIA kvpress `SnapKVPress` + `ScorerPress`):
  1. The last w = min(window, P) prompt queries (post-RoPE) attend to all P keys (post-RoPE) with the
     causal mask (window query i sits at position P-w+i); softmax over ALL keys, the window's own
     keys included (kvpress does the same), in float32.
  2. Average the probabilities over the w window queries, per query head.
  3. Only the pre-window columns [0, P-w) are scored (as kvpress): pool them along the token axis
     with a 1-D kernel (stride 1, zero padding k//2; avg divides by the full kernel, i.e.
     count_include_pad, exactly as torch's avg_pool1d used by kvpress), then average the G query
     heads of each KV group (kvpress pools per query head, then averages the group; for avg the
     order is irrelevant by linearity; "max", which kvpress lacks, pools each query head first).
     Caveat shared with kvpress: a wide avg box gives every token within k//2 of a spike nearly the
     same score, so a free budget smaller than the kernel may keep the spike's neighbours, not it.
  4. The window gets +inf (kvpress pads it with max+1: same effect), top-`budget` per KV head.

Deliberate differences from kvpress's SnapKV (at equal window/kernel/keep the scores of every
scored token are identical up to float rounding):
  * the first `sinks` prompt tokens are always kept (kvpress has no sinks);
  * selection is restricted to the region [region_start, P): the receiver already holds the exact
    prefix, which is never shipped and counts as kept for `mass`; scores/pooling still run over the
    whole prompt, so region tokens get exactly the scores kvpress would give them;
  * the budget counts region tokens (forced ones included) and is clamped to [forced, region], while
    kvpress's n_kept = int(P * (1 - ratio)) may cut into its own window when tiny;
  * everything is float32 (kvpress computes logits in the model dtype and casts the softmax back
    to it, e.g. bf16, before averaging), so near-ties may break differently;
  * ties are broken by position (stable sort) and indices are returned ascending (kvpress returns
    topk order, which is irrelevant to attention since keys are already rotated);
  * w = min(window, P) instead of kvpress's assert P > window;
  * the optional guard (below) and per-layer budgets whose total is round(mean * layers) (kvpress
    floors each layer: ours may give some layers one token more when mean * layers is fractional);
    our "pyramid" follows kvpress's PyramidKV staircase (beta=20) but over region tokens, and clamps
    to [min_tokens, region] with redistribution where kvpress falls back to uniform.

Guard: `mass` is the min over KV heads of the window's UNPOOLED averaged attention on the kept tokens
plus the held prefix (it is 1.0 when everything is kept). If mass < guard, the count is raised to the
smallest n' (same for all heads) at which every head reaches the guard, read off cumulative sums of
the attention along each head's pooled-score order (no loop over n).

Cost: one [Hkv, G*w, P] float32 logits tensor per call (P=128k, Hq=32, w=32 -> 512 MiB transient).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["SelectionParams", "LayerSelection", "BudgetProfile", "forced_count", "window_scores",
           "select_layer", "layer_budgets", "load_profile", "save_profile", "shipped_profile"]

PYRAMID_BETA = 20  # PyramidKV's default steepness (kvpress PyramidKVPress.beta): top layer gets mean/beta


@dataclass(frozen=True)
class SelectionParams:
    window: int = 32      # observation window: the last `window` prompt queries
    sinks: int = 4        # leading prompt tokens always kept (attention sinks)
    kernel: int = 63      # odd 1-D pooling kernel; wide keeps clusters (on SmolLM2 63 kept needles, 7 lost them)
    pooling: str = "avg"  # "avg" | "max"
    guard: float = 0.0    # min attention mass the kept tokens must hold per layer (0 = off)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SelectionParams.{field} {why}, got {getattr(self, field)!r}")
        if not isinstance(self.window, int) or self.window < 1:
            bad("window", "must be an int >= 1")
        if not isinstance(self.sinks, int) or self.sinks < 0:
            bad("sinks", "must be an int >= 0")
        if not isinstance(self.kernel, int) or self.kernel < 1 or self.kernel % 2 == 0:
            bad("kernel", "must be an odd int >= 1")
        if self.pooling not in ("avg", "max"):
            bad("pooling", "must be 'avg' or 'max'")
        if not isinstance(self.guard, (int, float)) or not 0.0 <= self.guard <= 1.0:
            bad("guard", "must be in [0, 1]")


@dataclass(frozen=True)
class LayerSelection:
    indices: torch.Tensor  # [Hkv, n] int64 absolute prompt positions, ascending per head, >= region_start
    num_kept: int          # n (same for every head)
    mass: float            # min over KV heads of the window's attention on kept + held tokens
    guard_raised: bool     # the guard raised the count above the (clamped) requested budget


def forced_count(prompt_len: int, region_start: int, params: SelectionParams) -> int:
    """Region tokens always kept: (first `sinks` tokens ∪ last min(window, P) tokens) ∩ region.
    A pure function of its arguments so payload sizes are known before the prefill runs."""
    if not 0 <= region_start <= prompt_len:
        raise ValueError(f"region_start must be in [0, prompt_len={prompt_len}], got {region_start}")
    win_start = prompt_len - min(params.window, prompt_len)
    sink_end = min(params.sinks, win_start)  # sinks overlapping the window are counted once
    return max(0, sink_end - region_start) + (prompt_len - max(win_start, region_start))


def _window_attention(q_window: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Causal softmax of the window queries over all keys, float32, as [Hkv, G, w, P]."""
    w, hq, d = q_window.shape
    p, hkv, _ = keys.shape
    g = hq // hkv
    # Query head h belongs to KV head h // G (the repeat_kv convention of HF / kvpress).
    q = q_window.float().permute(1, 0, 2).reshape(hkv, g * w, d)
    k = keys.float().permute(1, 0, 2)
    logits = torch.bmm(q, k.transpose(1, 2)).mul_(1.0 / math.sqrt(d)).view(hkv, g, w, p)
    future = torch.ones(w, p, dtype=torch.bool, device=keys.device).triu_(p - w + 1)
    return logits.masked_fill_(future, float("-inf")).softmax(dim=-1)


def window_scores(q_window: torch.Tensor, keys: torch.Tensor, params: SelectionParams
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, attn), both [Hkv, P] float32: pooled SnapKV scores (+inf on the sinks and the
    window) and the unpooled window attention averaged over window queries and the group."""
    p, hkv, _ = keys.shape
    w = min(params.window, p)
    probs = _window_attention(q_window[-w:], keys)        # [Hkv, G, w, P]
    per_qhead = probs.mean(dim=2)                         # [Hkv, G, P] mean over window queries
    attn = per_qhead.mean(dim=1)                          # [Hkv, P] unpooled: used for the mass
    scored = p - w                                        # kvpress scores only pre-window columns
    scores = torch.full((hkv, p), float("inf"), device=keys.device)
    if scored > 0:
        pad = params.kernel // 2
        if params.pooling == "avg":  # linear: pooling the group mean == mean of pooled heads
            pooled = F.avg_pool1d(attn[:, None, :scored], params.kernel, 1, pad)[:, 0]
        else:  # max does not commute with the mean: pool each query head, then average the group
            pooled = F.max_pool1d(per_qhead[..., :scored].reshape(-1, 1, scored), params.kernel, 1,
                                  pad).view(hkv, -1, scored).mean(dim=1)
        scores[:, :scored] = pooled
    scores[:, : min(params.sinks, p)] = float("inf")      # attention sinks are always kept
    return scores, attn


def select_layer(q_window: torch.Tensor, keys: torch.Tensor, region_start: int, budget: int,
                 params: SelectionParams) -> LayerSelection:
    """q_window [w, Hq, D]: post-RoPE queries of the last w = min(window, P) prompt tokens (extra
    leading rows are ignored). keys [P, Hkv, D]: post-RoPE keys of the whole prompt; Hq % Hkv == 0.
    Keeps, per KV head, `budget` tokens of [region_start, P) (clamped to [forced, region size]);
    the sinks and the window are always kept; [0, region_start) is held by the receiver."""
    if q_window.dim() != 3 or keys.dim() != 3 or q_window.shape[2] != keys.shape[2]:
        raise ValueError(f"need q_window [w, Hq, D] and keys [P, Hkv, D], got {tuple(q_window.shape)}"
                         f" and {tuple(keys.shape)}")
    p, hkv, _ = keys.shape
    hq = q_window.shape[1]
    if p < 1 or hq % hkv:
        raise ValueError(f"need P >= 1 and Hq % Hkv == 0, got P={p}, Hq={hq}, Hkv={hkv}")
    w = min(params.window, p)
    if q_window.shape[0] < w:
        raise ValueError(f"q_window has {q_window.shape[0]} queries, need min(window, P) = {w}")
    n_forced = forced_count(p, region_start, params)  # also validates region_start
    region = p - region_start
    n = max(n_forced, min(int(budget), region))

    scores, attn = window_scores(q_window, keys, params)

    # One descending stable sort serves both the top-n pick and the guard's cumulative mass,
    # so the guard grows exactly the selection a larger budget would have made.
    order = torch.sort(scores[:, region_start:], dim=1, descending=True, stable=True).indices
    held = attn[:, :region_start].double().sum(dim=1)     # [Hkv]; float64 for the 1.0 edge
    cum = held[:, None] + attn[:, region_start:].double().gather(1, order).cumsum(dim=1)

    def mass_at(k: int) -> float:
        return float((cum[:, k - 1] if k > 0 else held).min())

    mass = mass_at(n)
    raised = False
    if params.guard > 0 and mass < params.guard and n < region:
        # Per head, the prefix length at which the cumulative mass first reaches the guard
        # (cum is non-decreasing); if it never does, keep the whole region.
        need = int(((cum < params.guard).sum(dim=1) + 1).clamp_(max=region).max())
        if need > n:
            n, raised = need, True
            mass = mass_at(n)
    indices = order[:, :n].sort(dim=1).values.add_(region_start)
    return LayerSelection(indices=indices, num_kept=n, mass=mass, guard_raised=raised)


# ----------------------------------------------------------------------------- per-layer budgets

@dataclass(frozen=True)
class BudgetProfile:
    model: str
    num_layers: int
    weights: tuple[float, ...]
    note: str = ""


def _pyramid_targets(mean: float, num_layers: int, hi: int) -> list[float]:
    """PyramidKV's linear staircase (kvpress `PyramidKVPress.get_layer_budget`): bottom layer
    2*mean - mean/beta, top layer mean/beta; if the bottom exceeds the region, cap it there and
    raise the top so the mean holds (kvpress does the same)."""
    if num_layers == 1:
        return [mean]
    low = mean / PYRAMID_BETA
    top = 2 * mean - low
    if top > hi:
        top, low = float(hi), 2 * mean - hi
    step = (top - low) / (num_layers - 1)
    return [top - i * step for i in range(num_layers)]


def _fit_total(targets: list[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers in [lo, hi] summing to `total` (already inside [L*lo, L*hi]), shaped like
    clamp(lam * targets): bisect lam, then largest-remainder rounding (ties -> lower layer, which
    keeps a non-increasing shape non-increasing)."""
    def shaped(lam):
        return [min(hi, max(lo, lam * t)) for t in targets]
    a, b = 0.0, hi / max(min(targets), 1e-12) + 1.0
    for _ in range(100):  # L is small; sum(shaped(lam)) is continuous and non-decreasing in lam
        mid = (a + b) / 2
        a, b = (mid, b) if sum(shaped(mid)) < total else (a, mid)
    vals = shaped(b)
    out = [int(math.floor(v)) for v in vals]
    rest = sorted(range(len(vals)), key=lambda i: (-(vals[i] - out[i]), i))
    diff = total - sum(out)
    # sum(vals) ~= total after bisection, so |diff| < L: add to the largest remainders, or (float
    # fuzz overshoot) take from the smallest ones, never leaving [lo, hi].
    for i in (rest if diff > 0 else reversed(rest)):
        if diff == 0:
            break
        if diff > 0 and out[i] < hi:
            out[i], diff = out[i] + 1, diff - 1
        elif diff < 0 and out[i] > lo:
            out[i], diff = out[i] - 1, diff + 1
    return out


def layer_budgets(region_tokens: int, keep: float | None, num_layers: int,
                  profile: Union[str, Sequence[float], BudgetProfile] = "uniform",
                  token_budget: int | None = None, min_tokens: int = 0) -> list[int]:
    """Tokens to keep per layer in a region of `region_tokens` tokens, with mean keep*region_tokens
    (0 < keep <= 1) or the absolute mean `token_budget` (exactly one of the two). profile:
    "uniform", "pyramid" (PyramidKV: linearly decreasing with depth, same mean), a sequence of
    num_layers positive weights (normalized to mean 1) or a BudgetProfile. Every entry is clamped
    to [min(min_tokens, region_tokens), region_tokens]; the total is round(mean * num_layers)
    clipped into [L*lo, L*hi], i.e. exact unless clamping makes it impossible. Pure function."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if region_tokens < 0:
        raise ValueError(f"region_tokens must be >= 0, got {region_tokens}")
    if (keep is None) == (token_budget is None):
        raise ValueError("give exactly one of keep and token_budget")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if token_budget is not None and token_budget < 0:
        raise ValueError(f"token_budget must be >= 0, got {token_budget}")
    mean = keep * region_tokens if keep is not None else float(token_budget)
    hi, lo = region_tokens, max(0, min(min_tokens, region_tokens))
    total = min(num_layers * hi, max(num_layers * lo, round(mean * num_layers)))
    if isinstance(profile, BudgetProfile):
        if profile.num_layers != num_layers:
            raise ValueError(f"profile {profile.model!r} has {profile.num_layers} layers, model has {num_layers}")
        profile = profile.weights
    if profile == "uniform":
        targets = [1.0] * num_layers
    elif profile == "pyramid":
        targets = _pyramid_targets(max(mean, 1e-9), num_layers, hi)
    elif isinstance(profile, str):
        raise ValueError(f"unknown profile {profile!r} (use 'uniform', 'pyramid' or weights)")
    else:
        targets = [float(x) for x in profile]
        if len(targets) != num_layers or min(targets, default=0) <= 0:
            raise ValueError(f"profile weights must be {num_layers} positive numbers, got {targets}")
    if hi == 0:
        return [0] * num_layers
    return _fit_total(targets, total, lo, hi)  # scale-invariant: normalizing to mean 1 is implicit


def load_profile(path) -> BudgetProfile:
    """Read {"model": str, "num_layers": L, "weights": [L positive numbers], "note": str?}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"budget profile {path}: cannot read JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"budget profile {path}: top level must be an object")
    for key in ("model", "num_layers", "weights"):
        if key not in data:
            raise ValueError(f"budget profile {path}: missing key {key!r}")
    n, weights = data["num_layers"], data["weights"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"budget profile {path}: num_layers must be a positive int, got {n!r}")
    if not isinstance(weights, list) or len(weights) != n:
        got = len(weights) if isinstance(weights, list) else type(weights).__name__
        raise ValueError(f"budget profile {path}: weights must be a list of num_layers={n} numbers, got {got}")
    for i, x in enumerate(weights):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not x > 0 or not math.isfinite(x):
            raise ValueError(f"budget profile {path}: weight {i} must be a positive number, got {x!r}")
    return BudgetProfile(model=str(data["model"]), num_layers=n,
                         weights=tuple(float(x) for x in weights), note=str(data.get("note", "")))


def save_profile(profile: BudgetProfile, path) -> None:
    data = {"model": profile.model, "num_layers": profile.num_layers,
            "weights": list(profile.weights), "note": profile.note}
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


PROFILE_DIR = Path(__file__).parent / "budget_profiles"


def shipped_profile(model: str, num_layers: int) -> Path | None:
    """The profile in workers/budget_profiles/ learned for ``model`` (same name, case
    insensitive, same layer count), or None: what ``budgets: learned`` uses by default."""
    for path in sorted(PROFILE_DIR.glob("*.json")):
        try:
            prof = load_profile(path)
        except ValueError:
            continue
        if prof.model.lower() == model.lower() and prof.num_layers == num_layers:
            return path
    return None
