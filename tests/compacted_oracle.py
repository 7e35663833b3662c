"""The oracle for decoding on a compacted cache: full-cache decoding with an attention
mask that hides exactly the dropped entries.

``compacted_run`` drives the real engine: a full prefill captures the prompt's KV, a
given index set per layer and KV head is encoded as a sparse payload (raw float32, so
lossless), reserved and installed on the decode side (``Engine.reserve`` /
``admit_prefilled``), then decoded greedily. ``masked_run`` is written independently of
the engine's paging: it keeps every prompt entry in one dense tensor per layer and
runs the same model token by token with a per-head boolean mask, no compaction, no
block tables. The two must agree."""

from __future__ import annotations

import math

import torch

from cluster import kv_codec
from cluster.compression import PayloadPlan
from cluster.kv_handoff import ReceivedKV, TransferDescriptor
from cluster.kv_layout import KVLayout
from workers.engine import Engine
from workers.sampling_params import SamplingParams


def prefill_kv(engine: Engine, prompt: list[int], window: int = 32):
    """(greedy first token, per layer (K, V) [P, Hkv, D] of the prompt, per layer the
    last ``window`` prompt queries [w, Hq, D]), via a full prefill in one chunk."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    queries: dict[int, torch.Tensor] = {}
    bs = engine.config.block_size

    def observe(chunks, done):
        for c in chunks:
            if c.request.request_id == "oracle-full" and c.samples:
                s = torch.arange(c.request.num_prompt_tokens)
                table = torch.tensor(c.request.block_ids)
                page = engine.kv_cache.layer(done.layer)[table[s // bs], :, s % bs]  # [P, 2, Hkv, D]
                kv[done.layer] = (page[:, 0].clone(), page[:, 1].clone())
                queries[done.layer] = done.queries_of(chunks.index(c))[-window:].clone()

    engine.runner.layer_observer = observe
    engine.add_request("oracle-full", prompt, SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    first = None
    while "oracle-full" in engine.requests:
        for o in engine.step():
            first = o.new_token_ids[0]
    engine.runner.layer_observer = None
    return first, [kv[i] for i in range(len(kv))], [queries[i] for i in range(len(queries))]


def compacted_run(
    engine: Engine, prompt: list[int], first: int, kv: list[tuple[torch.Tensor, torch.Tensor]],
    indices: list[torch.Tensor], steps: int, request_id: str = "oracle-compacted",
) -> tuple[list[int], list[torch.Tensor]]:
    """Install ``indices[l]`` ([Hkv, n_l] absolute prompt positions >= the held prefix)
    as the request's compacted KV and decode ``steps`` greedy tokens after ``first``.
    Returns (tokens after first, the logits each was sampled from)."""
    spec = engine.kv_cache.spec
    quant = kv_codec.get_quantizer("none", raw_dtype=spec.dtype)
    logits: list[torch.Tensor] = []
    engine.runner.logits_hook = lambda ids, lg: [logits.append(lg[i].clone()) for i, r in enumerate(ids) if r == request_id]
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    kept = [int(ix.shape[1]) for ix in indices]
    res = engine.reserve(request_id, prompt, params, lambda start, region: max(kept))
    start = res.num_cached_blocks * spec.block_size
    assert all(int(ix.min()) >= start for ix in indices if ix.numel()), "indices inside the held prefix"
    region = len(prompt) - start
    layout = KVLayout("oracle", str(spec.dtype).removeprefix("torch."), spec.num_layers, spec.num_kv_heads,
                      spec.head_dim, spec.block_size)
    plan = PayloadPlan("oracle", "none", 32, True, start, region, tuple(kept), region)
    desc = TransferDescriptor(request_id, 0, b"", "inprocess", layout, res.num_cached_blocks,
                              -(-len(prompt) // spec.block_size) - res.num_cached_blocks, 5.0, plan)
    msgs, sizes = [], []
    heads = torch.arange(spec.num_kv_heads)[None, :]
    for layer, (k, v) in enumerate(kv):
        idx = indices[layer].T  # [n, Hkv]
        m = kv_codec.encode_layer(quant, layer, k[idx, heads].contiguous(), v[idx, heads].contiguous())
        buf = torch.zeros(desc.capacity_per_layer, dtype=torch.uint8)
        buf[: m.numel()] = m
        msgs.append(buf)
        sizes.append(m.numel())
    engine.admit_prefilled(request_id, first, None, ReceivedKV(desc, None, msgs, sizes))
    out: list[int] = []
    while request_id in engine.requests:
        for o in engine.step():
            if o.request_id == request_id:
                out += o.new_token_ids
    engine.runner.logits_hook = None
    return out, logits


class _MaskedDensePlan:
    """Dense attention over every entry so far, with a per-layer [Hkv, L] keep mask."""

    def __init__(self, kv, masks, num_heads: int) -> None:
        self.k = [k.clone() for k, _ in kv]  # per layer [L, Hkv, D]
        self.v = [v.clone() for _, v in kv]
        self.masks = [m.clone() for m in masks]  # per layer [Hkv, L] bool
        self.num_heads = num_heads

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k[layer] = torch.cat([self.k[layer], k])
        self.v[layer] = torch.cat([self.v[layer], v])
        self.masks[layer] = torch.cat([self.masks[layer], torch.ones(k.shape[1], k.shape[0], dtype=torch.bool)], dim=1)
        K, V, M = self.k[layer], self.v[layer], self.masks[layer]
        group = self.num_heads // K.shape[1]
        out = torch.empty_like(q)  # [1, Hq, D]
        for h in range(self.num_heads):
            kv_h = h // group
            scores = (K[:, kv_h] @ q[0, h]) / math.sqrt(q.shape[-1])  # [L]
            scores = scores.masked_fill(~M[kv_h], float("-inf"))
            out[0, h] = torch.softmax(scores, dim=0) @ V[:, kv_h]
        return out


def masked_run(model, prompt_len: int, kv, indices: list[torch.Tensor], held: int, tokens: list[int]) -> list[torch.Tensor]:
    """Logits after feeding ``tokens`` one at a time from position prompt_len, on the
    full prompt KV with every entry hidden except [0, held) and ``indices``."""
    masks = []
    for (k, _), idx in zip(kv, indices):
        m = torch.zeros(k.shape[1], prompt_len, dtype=torch.bool)  # [Hkv, P]
        m[:, :held] = True
        m.scatter_(1, idx, True)
        masks.append(m)
    plan = _MaskedDensePlan(kv, masks, model.config.num_heads)
    out = []
    for i, t in enumerate(tokens):
        hidden = model(torch.tensor([t]), torch.tensor([prompt_len + i]), plan)
        out.append(model.compute_logits(hidden[-1:])[0])
    return out


def random_indices(num_layers: int, num_kv_heads: int, start: int, prompt_len: int, counts: list[int], seed: int) -> list[torch.Tensor]:
    """Per layer [Hkv, counts[l]] sorted positions in [start, prompt_len), a different set per head."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(num_layers):
        rows = [torch.randperm(prompt_len - start, generator=g)[: counts[layer]].sort().values + start for _ in range(num_kv_heads)]
        out.append(torch.stack(rows))
    return out
