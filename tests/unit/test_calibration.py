"""Learned per-layer budgets: the calibration's objective is exact where it must be
(full budgets give zero divergence, the forced tokens are always kept), its prefill
matches the engine's, the search never returns worse than uniform, and a profile is
what a decode worker's ``budgets: learned`` plans with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cluster.compression import CompressionSection, PresetOverrides
from tests.unit.test_model_loading import _build_hf, _hf_config, _prompt
from workers import calibration, kv_selection
from workers.config import EngineConfig
from workers.decode_worker import DecodeWorker
from workers.engine import Engine
from workers.loader import load_model, resolve_model
from workers.sampling_params import SamplingParams
from workers.worker import WorkerSpec

SETTINGS = calibration.CalibrationSettings(keep=(0.25,), target_tokens=6, window=8, sinks=2, kernel=7,
                                           max_evals=8, time_limit_s=60)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    _build_hf(_hf_config(heads=4, kv_heads=2, layers=3), seed=7, path=path)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(resolve_model(str(tiny_dir)), dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def states(tiny):
    return [calibration.prepare(tiny.model, _prompt(n, tiny.config.vocab_size, seed=n), SETTINGS) for n in (90, 130)]


def test_full_budgets_diverge_by_nothing_and_fewer_tokens_do(tiny, states):
    for s in states:
        assert calibration.divergence(tiny.model, s, [s.prompt_len] * len(s.keys)) < 1e-6
        small = calibration.budgets_for(s, 0.25, "uniform")
        assert sum(small) == round(0.25 * s.prompt_len * len(s.keys))
        assert calibration.divergence(tiny.model, s, small) > 1e-4


def test_the_forced_tokens_are_always_kept(states):
    s = states[0]
    masks = calibration.masks_for(s, [s.forced] * len(s.keys))
    forced = torch.zeros(s.prompt_len, dtype=torch.bool)
    forced[: SETTINGS.sinks] = True
    forced[s.prompt_len - SETTINGS.window:] = True
    for m in masks:  # exactly sinks + window on every KV head
        assert torch.equal(m, forced.expand_as(m))


def test_prefill_and_greedy_continuation_match_the_engine(tiny, states):
    """The calibration's own dense pass is the same computation as the engine's."""
    s = states[0]
    prompt = _prompt(90, tiny.config.vocab_size, seed=90)
    engine = Engine(EngineConfig(num_kv_blocks=64, block_size=16, max_model_len=512, attention_backend="torch",
                                 device="cpu", dtype="float32"), loaded=tiny)
    [out] = engine.generate([prompt], SamplingParams(max_tokens=SETTINGS.target_tokens, temperature=0, ignore_eos=True))
    assert s.feed.tolist() == out[: SETTINGS.target_tokens]


def test_search_never_returns_worse_than_uniform_and_writes_a_loadable_profile(tiny, states, tmp_path):
    seen = []
    result = calibration.calibrate(tiny.model, states, SETTINGS, lambda n, best: seen.append((n, best)))
    assert result.evaluations == len(seen) <= SETTINGS.max_evals
    assert result.objective <= result.baselines["uniform"]
    assert [b for _, b in seen] == sorted((b for _, b in seen), reverse=True)  # best-so-far only improves
    assert len(result.weights) == 3 and abs(sum(result.weights) / 3 - 1) < 1e-3
    path = tmp_path / "profile.json"
    calibration.write_profile(path, "tiny", result, SETTINGS, len(states), 110.0)
    prof = kv_selection.load_profile(path)
    assert prof.num_layers == 3 and prof.weights == tuple(result.weights)
    assert json.loads(path.read_text())["calibration"]["objective"]["uniform"] == round(result.baselines["uniform"], 5)


def test_learned_budgets_plan_with_the_configured_profile(tiny_dir, tmp_path):
    """``budgets: learned`` plans with the deployment's profile: a budget per layer in
    the profile's shape, the preset's total; a profile with the wrong layer count is
    refused when the worker starts."""
    path = tmp_path / "p.json"
    kv_selection.save_profile(kv_selection.BudgetProfile("tiny", 3, (2.0, 1.0, 0.5)), path)
    section = CompressionSection(profile=str(path), presets={"learned-max": PresetOverrides(preset="max", budgets="learned")})
    engine = EngineConfig(model=str(tiny_dir), num_kv_blocks=64, block_size=16, max_model_len=512,
                          attention_backend="torch", device="cpu", dtype="float32")
    worker = DecodeWorker(WorkerSpec("decode", 0, engine, "none", compression=section))
    label, settings = section.resolve("learned-max")
    plan = worker._plan(label, settings, 400, 0, 400)
    assert plan.budgets == tuple(kv_selection.layer_budgets(400, 0.25, 3, [2.0, 1.0, 0.5], min_tokens=36))
    assert sum(plan.budgets) == 300 and plan.budgets[0] > plan.budgets[1] > plan.budgets[2]
    uniform = worker._plan("max", CompressionSection().resolve("balanced")[1], 400, 0, 400)
    assert uniform.budgets == (200, 200, 200)  # the built-in balanced: uniform

    kv_selection.save_profile(kv_selection.BudgetProfile("tiny", 4, (1.0,) * 4), path)
    with pytest.raises(ValueError, match="4 layers, the model has 3"):
        DecodeWorker(WorkerSpec("decode", 0, engine, "none", compression=section))


def test_the_shipped_profile_is_found_for_its_model_only():
    path = kv_selection.shipped_profile("SmolLM2-135M-Instruct", 30)
    assert path is not None and path.parent == kv_selection.PROFILE_DIR
    prof = kv_selection.load_profile(path)
    assert prof.num_layers == 30 and all(w > 0 for w in prof.weights)
    assert kv_selection.shipped_profile("SmolLM2-135M-Instruct", 24) is None
    assert kv_selection.shipped_profile("another-model", 30) is None
