"""Unit tests for workers/kv_selection.py: SnapKV-style token selection, per-layer budgets, guard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from workers.kv_selection import (
    BudgetProfile,
    LayerSelection,
    SelectionParams,
    forced_count,
    layer_budgets,
    load_profile,
    save_profile,
    select_layer,
    window_scores,
)

PROFILE_DIR = Path(__file__).resolve().parents[2] / "workers" / "budget_profiles"


def rand_qk(p=200, hq=6, hkv=2, d=16, w=32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(p, hkv, d, generator=g) * scale
    q = torch.randn(min(w, p), hq, d, generator=g) * scale
    return q, keys


def check_shape(sel: LayerSelection, p: int, hkv: int, region_start: int, n: int):
    assert sel.indices.dtype == torch.int64
    assert tuple(sel.indices.shape) == (hkv, n) and sel.num_kept == n
    if n:
        assert int(sel.indices.min()) >= region_start and int(sel.indices.max()) < p
        assert bool((sel.indices[:, 1:] > sel.indices[:, :-1]).all())  # strictly ascending


# ------------------------------------------------------------------ reference (explicit loops)

def reference_scores(q, keys, params):
    """Straightforward SnapKV scores: per query head, per window query, causal softmax over all
    keys; mean over queries; pool the pre-window columns (zero pad, divide by kernel for avg);
    mean over the KV group; +inf for sinks and window."""
    w, hq, d = q.shape
    p, hkv, _ = keys.shape
    g = hq // hkv
    q, keys = q.double(), keys.double()
    attn_q = torch.zeros(hq, p, dtype=torch.float64)
    for h in range(hq):
        kv = h // g
        for i in range(w):
            pos = p - w + i
            logits = [float(q[i, h] @ keys[j, kv]) / math.sqrt(d) for j in range(pos + 1)]
            m = max(logits)
            e = [math.exp(x - m) for x in logits]
            z = sum(e)
            for j in range(pos + 1):
                attn_q[h, j] += e[j] / z / w
    scored, pad = p - w, params.kernel // 2
    pooled_q = torch.zeros(hq, max(scored, 0), dtype=torch.float64)
    for h in range(hq):
        for t in range(scored):
            nb = [float(attn_q[h, s]) for s in range(t - pad, t + pad + 1) if 0 <= s < scored]
            pooled_q[h, t] = sum(nb) / params.kernel if params.pooling == "avg" else max(nb)
    scores = torch.full((hkv, p), math.inf, dtype=torch.float64)
    attn = torch.zeros(hkv, p, dtype=torch.float64)
    for kv in range(hkv):
        heads = range(kv * g, (kv + 1) * g)
        attn[kv] = sum(attn_q[h] for h in heads) / g
        if scored > 0:
            scores[kv, :scored] = sum(pooled_q[h] for h in heads) / g
        scores[kv, : min(params.sinks, p)] = math.inf
    return scores, attn


@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 1), (3, 3)])
def test_scores_match_loop_reference(pooling, hq, hkv):
    params = SelectionParams(window=8, sinks=2, kernel=5, pooling=pooling)
    q, keys = rand_qk(p=40, hq=hq, hkv=hkv, d=8, w=8, seed=hq + hkv, scale=2.0)
    scores, attn = window_scores(q, keys, params)
    ref_scores, ref_attn = reference_scores(q, keys, params)
    torch.testing.assert_close(attn.double(), ref_attn, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-7)
    assert torch.allclose(attn.sum(-1), torch.ones(hkv), atol=1e-5)  # rows sum to 1 incl. window
    # Selection = top-budget of the reference scores in the region (with budget > forced).
    sel = select_layer(q, keys, region_start=3, budget=20, params=params)
    for kv in range(hkv):
        region = ref_scores[kv, 3:]
        expect = sorted((torch.argsort(-region, stable=True)[:20] + 3).tolist())
        assert sel.indices[kv].tolist() == expect


def test_causal_mask_inside_window():
    # The last key is huge for every query; only the last window query may see it.
    p, w = 50, 8
    q, keys = rand_qk(p=p, hq=2, hkv=1, d=8, w=w, seed=3)
    keys[-1] = q[-1].mean(0) * 50
    base = window_scores(q, keys, SelectionParams(window=w, kernel=1))[1]
    keys2 = keys.clone()
    keys2[-1] = 0
    # Changing the last key only changes the last query's row: earlier queries never saw it.
    other = window_scores(q, keys2, SelectionParams(window=w, kernel=1))[1]
    assert (base[0, : p - 1] < other[0, : p - 1]).all()
    assert base[0, -1] <= 1.0 / w + 1e-6  # at most the one query that sees it


def test_matches_kvpress_style_full_prompt_pipeline():
    """kvpress's SnapKV on the full prompt (4-D layout, repeat_kv, triu mask, drop window columns,
    avg-pool then group mean, pad window with max+1, topk of int(P*(1-ratio))): same kept set when
    sinks=0 and region_start=0."""
    p, hq, hkv, d, w, k, ratio = 200, 6, 2, 16, 32, 7, 0.6
    q, keys = rand_qk(p, hq, hkv, d, w, seed=11, scale=2.0)
    g = hq // hkv
    qs = q.permute(1, 0, 2)[None]                                   # [1, Hq, w, D]
    ks = keys.permute(1, 0, 2)[None].repeat_interleave(g, dim=1)    # [1, Hq, P, D]
    logits = qs @ ks.transpose(2, 3) / math.sqrt(d)
    logits = logits + torch.full_like(logits, -math.inf).triu(p - w + 1)
    a = logits.softmax(-1)[..., :-w].mean(-2)
    a = F.avg_pool1d(a, k, 1, k // 2).view(1, hkv, g, p - w).mean(2)
    s = F.pad(a, (0, w), value=a.max().item() + 1)
    n_kept = int(p * (1 - ratio))
    expect = s.topk(n_kept, dim=-1).indices[0].sort(-1).values
    sel = select_layer(q, keys, 0, n_kept, SelectionParams(window=w, sinks=0, kernel=k))
    assert torch.equal(sel.indices, expect)


# ------------------------------------------------------------------ behaviour

@pytest.mark.parametrize("kernel", [1, 63])
def test_planted_needle_is_selected(kernel):
    p, hq, hkv, d, w = 200, 6, 2, 16, 32
    q, keys = rand_qk(p, hq, hkv, d, w, seed=5, scale=0.3)
    needle = [100, 101, 102]
    g = torch.Generator().manual_seed(9)
    for kv in range(hkv):  # every query of the group leans towards u; the needle keys are along u
        u = torch.randn(d, generator=g)
        u /= u.norm()
        q[:, kv * 3 : kv * 3 + 3] += 2 * u
        keys[needle, kv] = 8 * u
    params = SelectionParams(window=w, sinks=4, kernel=kernel)
    forced = forced_count(p, 0, params)
    if kernel == 1:
        sel = select_layer(q, keys, 0, forced + 3, params)
        for kv in range(hkv):
            assert set(sel.indices[kv].tolist()) == set(range(4)) | set(needle) | set(range(p - w, p))
        return
    # A 63-wide box spreads the needle over [100-31, 102+31]: those 65 tokens outrank the rest,
    # so a budget of 65 free slots keeps exactly the needle with its neighbourhood...
    plateau = set(range(69, 134))
    sel = select_layer(q, keys, 0, forced + len(plateau), params)
    for kv in range(hkv):
        assert set(sel.indices[kv].tolist()) - set(range(4)) - set(range(p - w, p)) == plateau
    # ...and a smaller one spends every free slot inside that neighbourhood.
    sel = select_layer(q, keys, 0, forced + 20, params)
    for kv in range(hkv):
        assert set(sel.indices[kv].tolist()) - set(range(4)) - set(range(p - w, p)) <= plateau


def test_sinks_window_budget_and_clamping():
    p, hkv, w = 200, 2, 32
    q, keys = rand_qk(p, 6, hkv, 16, w, seed=1)
    params = SelectionParams(window=w, sinks=4, kernel=63)
    forced = forced_count(p, 0, params)
    assert forced == 4 + 32
    for budget, expect in [(50, 50), (forced, forced), (3, forced), (-5, forced), (10_000, p)]:
        sel = select_layer(q, keys, 0, budget, params)
        check_shape(sel, p, hkv, 0, expect)
        for kv in range(hkv):
            kept = set(sel.indices[kv].tolist())
            assert set(range(4)) | set(range(p - w, p)) <= kept
    assert select_layer(q, keys, 0, p, params).guard_raised is False


def test_region_excludes_held_prefix_and_mass_counts_it():
    p, hkv, w = 200, 2, 32
    q, keys = rand_qk(p, 6, hkv, 16, w, seed=2)
    params = SelectionParams(window=w, sinks=4, kernel=63)
    rs = 120
    assert forced_count(p, rs, params) == w  # sinks are in the held prefix
    sel = select_layer(q, keys, rs, 40, params)
    check_shape(sel, p, hkv, rs, 40)
    _, attn = window_scores(q, keys, params)
    idx = sel.indices
    per_head = attn[:, :rs].sum(-1) + attn.gather(1, idx).sum(-1)
    assert sel.mass == pytest.approx(float(per_head.min()), abs=1e-6)
    assert sel.mass > float(attn.gather(1, idx).sum(-1).min())  # held prefix counted
    # Forced counts: region inside the window, empty region, sinks overlapping the window.
    assert forced_count(p, p - 10, params) == 10
    assert forced_count(p, p, params) == 0
    assert forced_count(20, 0, SelectionParams(window=32, sinks=4)) == 20
    assert forced_count(34, 0, SelectionParams(window=32, sinks=4)) == 34
    assert forced_count(34, 1, SelectionParams(window=32, sinks=4)) == 33
    empty = select_layer(q, keys, p, 5, params)
    check_shape(empty, p, hkv, p, 0)
    assert empty.mass == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="region_start"):
        select_layer(q, keys, p + 1, 5, params)


def test_guard_raises_count_on_diffuse_attention():
    p, hkv, w = 200, 2, 32
    q, keys = rand_qk(p, 6, hkv, 16, w, seed=4, scale=0.1)  # small logits: nearly uniform attention
    base = SelectionParams(window=w, sinks=4, kernel=63)
    off = select_layer(q, keys, 0, 60, base)
    assert off.num_kept == 60 and off.guard_raised is False and off.mass < 0.99
    on = select_layer(q, keys, 0, 60, SelectionParams(window=w, sinks=4, kernel=63, guard=0.99))
    assert on.guard_raised is True and 60 < on.num_kept <= p and on.mass >= 0.99
    check_shape(on, p, hkv, 0, on.num_kept)
    # Smallest such n: one token fewer (same order) misses the guard on some head.
    scores, attn = window_scores(q, keys, base)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    cum = attn.double().gather(1, order).cumsum(1)
    assert float(cum[:, on.num_kept - 2].min()) < 0.99
    # The guarded selection extends the unguarded one.
    for kv in range(hkv):
        assert set(off.indices[kv].tolist()) <= set(on.indices[kv].tolist())
    # Unreachable by rounding (guard 1.0): keep the whole region, flagged.
    full = select_layer(q, keys, 0, 60, SelectionParams(window=w, guard=1.0))
    assert full.num_kept in range(61, p + 1) and full.guard_raised is True
    # A guard already met raises nothing.
    met = select_layer(q, keys, 0, 60, SelectionParams(window=w, guard=off.mass * 0.5))
    assert met.num_kept == 60 and met.guard_raised is False


def test_keep_all_is_identity_and_mqa_and_short_prompt():
    p = 200
    q, keys = rand_qk(p, 4, 1, 16, 32, seed=6)
    sel = select_layer(q, keys, 0, layer_budgets(p, 1.0, 1)[0], SelectionParams())
    assert torch.equal(sel.indices, torch.arange(p)[None])
    assert sel.mass == pytest.approx(1.0, abs=1e-5)
    mqa = select_layer(q, keys, 10, 50, SelectionParams())
    check_shape(mqa, p, 1, 10, 50)
    # P < window: everything is window, all kept; extra leading query rows are ignored.
    qs, ks = rand_qk(10, 4, 2, 8, 10, seed=7)
    short = select_layer(qs, ks, 0, 3, SelectionParams(window=32))
    assert torch.equal(short.indices, torch.arange(10).expand(2, 10))
    with pytest.raises(ValueError, match="min\\(window, P\\)"):
        select_layer(qs[:5], ks, 0, 3, SelectionParams(window=32))
    with pytest.raises(ValueError, match="Hq % Hkv"):
        select_layer(*rand_qk(20, 5, 2, 8, 8), 0, 3, SelectionParams(window=8))


def test_bf16_inputs_and_small_pre_window():
    q, keys = rand_qk(40, 6, 2, 16, 32, seed=8)
    # 8 scored tokens with kernel 63 (padding wider than the scored span) for both poolings.
    for pooling in ("avg", "max"):
        sel = select_layer(q.bfloat16(), keys.bfloat16(), 0, 37, SelectionParams(pooling=pooling))
        check_shape(sel, 40, 2, 0, 37)


# ------------------------------------------------------------------ params

@pytest.mark.parametrize("kwargs,field", [
    ({"window": 0}, "window"), ({"sinks": -1}, "sinks"), ({"kernel": 4}, "kernel"),
    ({"kernel": 0}, "kernel"), ({"pooling": "mean"}, "pooling"), ({"guard": 1.5}, "guard"),
    ({"guard": -0.1}, "guard"),
])
def test_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=f"SelectionParams.{field}"):
        SelectionParams(**kwargs)


# ------------------------------------------------------------------ budgets

def test_uniform_budgets():
    assert layer_budgets(1000, 0.3, 4) == [300] * 4
    b = layer_budgets(1001, 0.25, 4)  # mean 250.25 -> total round(1001) = 1001
    assert sum(b) == 1001 and max(b) - min(b) <= 1
    assert layer_budgets(100, None, 3, token_budget=40) == [40] * 3
    assert layer_budgets(100, None, 3, token_budget=500) == [100] * 3   # clamped to the region
    assert layer_budgets(100, 0.1, 3, min_tokens=36) == [36] * 3        # clamped up to forced
    assert layer_budgets(20, 0.5, 2, min_tokens=36) == [20, 20]         # min_tokens > region
    assert layer_budgets(0, 0.5, 2) == [0, 0]


def test_pyramid_budgets():
    b = layer_budgets(4000, 0.2, 24, "pyramid")
    assert all(x >= y for x, y in zip(b, b[1:])) and b[0] > b[-1]
    assert sum(b) == round(0.2 * 4000 * 24)
    # Heavy keep: the bottom layers hit the region size, the mean still holds.
    b = layer_budgets(1000, 0.8, 10, "pyramid", min_tokens=36)
    assert all(x >= y for x, y in zip(b, b[1:])) and max(b) <= 1000 and min(b) >= 36
    assert sum(b) == 8000
    b = layer_budgets(1000, 0.05, 30, "pyramid", min_tokens=36)  # low end clamped up to 36
    assert min(b) == 36 and all(x >= y for x, y in zip(b, b[1:]))
    assert sum(b) == 1500
    assert layer_budgets(500, 0.5, 1, "pyramid") == [250]


def test_weight_profile_budgets(tmp_path):
    b = layer_budgets(1000, 0.5, 4, [1, 1, 2, 4])  # normalized to mean 1: 0.5, 0.5, 1, 2
    assert b == [250, 250, 500, 1000]
    b = layer_budgets(1000, 0.5, 4, [1, 1, 1, 8])  # 8/2.75*500 > 1000: capped, excess spread
    assert b[3] == 1000 and sum(b) == 2000 and b[:3] == [334, 333, 333]
    prof = BudgetProfile("m", 4, (1.0, 1.0, 2.0, 4.0))
    assert layer_budgets(1000, 0.5, 4, prof) == [250, 250, 500, 1000]
    with pytest.raises(ValueError, match="4 layers"):
        layer_budgets(1000, 0.5, 5, prof)
    with pytest.raises(ValueError, match="positive"):
        layer_budgets(1000, 0.5, 2, [1, 0])
    with pytest.raises(ValueError, match="positive"):
        layer_budgets(1000, 0.5, 3, [1, 2])
    with pytest.raises(ValueError, match="unknown profile"):
        layer_budgets(1000, 0.5, 3, "steep")
    with pytest.raises(ValueError, match="exactly one"):
        layer_budgets(1000, None, 3)
    with pytest.raises(ValueError, match="exactly one"):
        layer_budgets(1000, 0.5, 3, token_budget=4)
    with pytest.raises(ValueError, match="keep"):
        layer_budgets(1000, 0.0, 3)


def test_profile_round_trip_and_errors(tmp_path):
    prof = BudgetProfile("smollm2-135m", 3, (2.0, 1.0, 0.5), note="test")
    path = tmp_path / "p.json"
    save_profile(prof, path)
    assert load_profile(path) == prof
    cases = {
        "missing": ({"model": "m", "num_layers": 2}, "missing key 'weights'"),
        "length": ({"model": "m", "num_layers": 3, "weights": [1, 2]}, "num_layers=3"),
        "nonpos": ({"model": "m", "num_layers": 2, "weights": [1, 0]}, "weight 1 must be a positive"),
        "layers": ({"model": "m", "num_layers": 0, "weights": []}, "num_layers must be"),
    }
    for name, (data, msg) in cases.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(data))
        with pytest.raises(ValueError, match=msg) as info:
            load_profile(f)
        assert str(f) in str(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read JSON"):
        load_profile(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "absent.json")


def test_sample_profiles_load():
    files = sorted(PROFILE_DIR.glob("*.json"))
    assert files
    for f in files:
        prof = load_profile(f)
        b = layer_budgets(1000, 0.3, prof.num_layers, prof, min_tokens=36)
        assert sum(b) == 300 * prof.num_layers
