"""The engine: one model, one KV pool, one scheduler; ``add_request / step / abort``.

    step():  schedule -> run the model -> append sampled tokens -> collect finished

Not thread-safe: one caller drives it (the async wrapper runs it on its own thread).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from cluster.block_hash import BlockHasher
from cluster.worker_api import CapacityError, RequestOutput
from workers.attention import get_backend
from workers.block_manager import BlockManager
from workers.config import EngineConfig
from workers.grammar import Grammars, load_hf_tokenizer
from workers.kv_cache import KVCache, KVCacheSpec
from workers.loader import LoadedModel, load_model, resolve_model
from workers.model_runner import ModelRunner
from workers.model.packed_linear import set_linear_kernel
from workers.request import CompactedKV, Request, RequestStatus, TokenLogprobs, generator_from_state, rng_state_bytes
from workers.sampler import SampledToken, Sampler
from workers.sampling_params import SamplingParams
from workers.scheduler import SchedulerOutput, Scheduler

if TYPE_CHECKING:
    from cluster.kv_handoff import ReceivedKV

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reservation:
    """Blocks a decode engine set aside for a request whose prompt KV comes from a
    prefill worker. The first ``num_cached_blocks`` prompt blocks were already in this
    engine's prefix cache; blocks ``[num_cached_blocks, len(block_ids))`` hold what
    must arrive: ``suffix_slots`` KV entries (fewer than the suffix's tokens when the
    payload is a sparse selection)."""

    request_id: str
    num_prompt_tokens: int
    num_cached_blocks: int
    block_ids: tuple[int, ...]
    suffix_slots: int


@dataclass
class EngineStats:
    """Counters realized by the engine (what the router's predictions are checked against)."""

    prompt_tokens: int = 0  # prompt tokens of admitted requests
    prefix_cache_query_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefill_computed_tokens: int = 0  # tokens run through the model in prefill chunks
    generation_tokens: int = 0
    preemptions: int = 0
    kv_recomputes: int = 0  # handed-off requests whose KV never arrived: recomputed here
    # Compressed handoffs that lost their compression, by reason: "capacity" (no room for
    # what the guard added), "preempted" (recomputed at full size), "codec" (malformed payload)
    compression_fallbacks: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        device = config.resolved_device()
        dtype = config.resolved_dtype()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        if loaded is None:
            loaded = load_model(resolve_model(config.model), dtype=dtype, device=device)
        self.loaded = loaded
        self.linear_kernel = set_linear_kernel(loaded.model, config.linear_kernel)
        self.model_config = loaded.config
        self.max_model_len = config.max_model_len or loaded.config.max_position_embeddings
        if self.max_model_len > loaded.config.max_position_embeddings:
            raise ValueError(
                f"max_model_len ({self.max_model_len}) exceeds the model's context "
                f"({loaded.config.max_position_embeddings})"
            )
        spec = KVCacheSpec.for_model(loaded.config, config.block_size, loaded.dtype)
        num_blocks = config.num_kv_blocks or spec.num_blocks_for(int(config.kv_cache_memory_gb * 2**30))
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds no block of {spec.bytes_per_block} bytes")
        self.kv_cache = KVCache(spec, num_blocks, loaded.device)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.hasher = BlockHasher(config.block_size, config.hash_seed)  # the deployment's keyed block hash
        self.scheduler = Scheduler(config, self.block_manager)
        source = loaded.source
        grammars = Grammars(lambda: load_hf_tokenizer(source)) if source is not None else None
        self.sampler = Sampler(loaded.config.eos_token_ids, config.seed, grammars)
        backend = get_backend(config.attention_backend, loaded.device, decode_context_copies=config.decode_context_copies,
                              decode_context_copies_max_seqs=config.decode_context_copies_max_seqs)
        self.runner = ModelRunner(loaded.model, self.kv_cache, backend, self.sampler, loaded.device)
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        log.info("engine: %d KV blocks of %d tokens (%.1f MiB), backend %s, linear kernel %s", num_blocks,
                 config.block_size, self.kv_cache.nbytes / 2**20, backend.name, self.linear_kernel)

    # ---- requests -------------------------------------------------------------------

    def validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError saying what is wrong; changes nothing."""
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        n = len(prompt_token_ids)
        bad = [t for t, _ in params.logit_bias if t >= vocab]
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
        if params.json_schema is not None:
            if self.sampler.grammars is None:
                raise ValueError("json_schema needs the model's tokenizer, which this engine does not have")
            self.sampler.grammars.preload()  # overlaps this request's prefill
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_model_len} tokens"
            )
        need = self.block_manager.blocks_for(n + params.max_tokens)
        if need > self.block_manager.num_blocks:
            raise ValueError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) needs {need} KV blocks; "
                f"the KV pool has {self.block_manager.num_blocks}"
            )

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, rng_state: bytes | None = None
    ) -> None:
        """``rng_state`` continues another request's sampling RNG (a migrated request)."""
        self.validate(request_id, prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, self.config.block_size, self.hasher)
        if rng_state is not None:
            req.generator = generator_from_state(rng_state)
        self.requests[request_id] = req
        self.scheduler.add(req)

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its KV; False if it is unknown or already done."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return False
        self.scheduler.finish(req, RequestStatus.FINISHED_ABORTED)
        if not self.requests:
            self.runner.backend.release()
        return True

    # ---- disaggregation: the decode side of a handoff ---------------------------------

    def reserve(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        suffix_slots: Callable[[int, int], int] | None = None,
    ) -> Reservation:
        """Set aside blocks for a prompt whose KV a prefill worker will send; reuse
        every full prompt block this engine already caches (those are not sent).
        ``suffix_slots(region_start, region_tokens)`` says how many KV slots the shipped
        suffix needs (default: one per token; fewer for a sparse payload)."""
        self.validate(request_id, prompt_token_ids, params)
        req = Request(request_id, list(prompt_token_ids), params, self.config.block_size, self.hasher)
        bm = self.block_manager
        prefix = bm.match_prefix(req.block_hashes, req.token_ids, req.root_hash)  # full prompt blocks only
        start = prefix.num_blocks * self.config.block_size
        region = req.num_prompt_tokens - start
        slots = region if suffix_slots is None else suffix_slots(start, region)
        need = bm.blocks_for(start + slots) - prefix.num_blocks
        # Room to decode, not only to land: this request's output and every held
        # request's (capped at decode_reserve_tokens each; Scheduler.growth_blocks).
        cap = self.config.decode_reserve_tokens
        growth = bm.blocks_for(start + slots + min(params.max_tokens, cap)) - prefix.num_blocks - need
        growth += self.scheduler.growth_blocks(cap)
        if not bm.can_allocate(need + growth, prefix):
            raise CapacityError(
                f"KV pool full: {need} blocks needed and {growth} kept for decoding, "
                f"{bm.num_free_blocks - prefix.num_free} available"
            )
        req.block_ids = bm.allocate(need, prefix)
        req.num_cached_blocks = prefix.num_blocks
        req.num_cached_tokens = start
        self.requests[request_id] = req
        self.scheduler.add_remote(req)
        return Reservation(request_id, req.num_prompt_tokens, prefix.num_blocks, tuple(req.block_ids), slots)

    def admit_prefilled(
        self,
        request_id: str,
        first_token: int | None,
        first_logprobs: TokenLogprobs | None = None,
        kv: "ReceivedKV | None" = None,
        rng_state: bytes | None = None,
    ) -> RequestOutput | None:
        """Start decoding a reserved request.

        With ``kv`` (what arrived from the prefill worker) the KV is installed and the
        request joins the running batch at its true position. Without it (the transfer
        failed or the prefill worker died) the prompt is recomputed here, and counted.
        ``first_token`` (sampled by the prefill worker) continues the output; None
        means it was never produced. ``rng_state`` continues the prefill worker's
        sampling RNG, so a seeded request samples exactly as on one worker. Returns an
        output if the first token already ends the request."""
        req = self.scheduler.waiting_remote[request_id]
        if rng_state is not None:
            req.generator = generator_from_state(rng_state)
        installed = kv is not None and self._install(req, kv)
        if first_token is not None:
            req.append_token(first_token)
            if first_logprobs is not None:
                req.output_logprobs.append(first_logprobs)
        if installed and first_token is not None:
            self.scheduler.remote_kv_arrived(req)
        else:
            self.stats.kv_recomputes += 1
            self.scheduler.remote_kv_failed(req)
        if first_token is None:
            return None
        reason = self._stop_reason(req, first_token)
        if reason is None:
            return None
        self._finish(req, reason)
        return self._output(req, first_token, first_logprobs)

    def _install(self, req: Request, kv: "ReceivedKV") -> bool:
        """Write what arrived into the request's blocks; False if it cannot be used
        (then the request is recomputed here, and the reason counted)."""
        spec = self.kv_cache.spec
        if len(kv.sizes) != spec.num_layers and kv.desc.num_blocks:
            raise ValueError(f"expected KV for {spec.num_layers} layers, got {len(kv.sizes)}")
        if kv.lossless:
            self._install_pages(req, kv.pages or [])
        elif not self._install_tokens(req, kv):
            return False
        self._count_admission(req)
        return True

    def _install_pages(self, req: Request, pages: list[torch.Tensor]) -> None:
        spec = self.kv_cache.spec
        ids = torch.tensor(req.block_ids[req.num_cached_blocks :], dtype=torch.int64, device=self.kv_cache.storage.device)
        shape = (len(ids), 2, spec.block_size, spec.num_kv_heads, spec.head_dim)
        if len(ids):
            for layer, buf in enumerate(pages):
                self.kv_cache.layer(layer)[ids] = buf.view(shape).to(self.kv_cache.storage.device, spec.dtype)
        req.num_computed_tokens = req.num_prompt_tokens
        full = req.num_prompt_tokens // self.config.block_size
        self.block_manager.cache_blocks(req.block_ids, req.block_hashes, req.num_cached_blocks, full, req.token_ids, req.root_hash)
        req.num_cached_blocks = full

    def _install_tokens(self, req: Request, kv: "ReceivedKV") -> bool:
        """A compressed payload: layer l's kept tokens go to slots [start, start + n_l)
        of the suffix (see CompactedKV); the blocks stay private."""
        from cluster.kv_codec import CodecError

        spec, bm, bs = self.kv_cache.spec, self.block_manager, self.config.block_size
        start = req.num_cached_blocks * bs
        try:
            kept = tuple(kv.num_tokens(layer) for layer in range(spec.num_layers))
        except CodecError as e:
            log.warning("%s: malformed KV payload (%s): recomputing", req.request_id, e)
            self._count_fallback("codec")
            return False
        slots = max(kept)
        need = bm.blocks_for(start + slots) - len(req.block_ids)
        if need > 0:  # the guard kept more than planned
            if not bm.can_allocate(need):
                self._count_fallback("capacity")
                return False
            req.block_ids += bm.allocate(need)
        elif need < 0:  # fewer than planned: give the spare blocks back
            spare = req.block_ids[len(req.block_ids) + need :]
            del req.block_ids[len(req.block_ids) + need :]
            bm.free(spare)
        device = self.kv_cache.storage.device
        table = torch.tensor(req.block_ids, dtype=torch.int64, device=device)
        try:
            for layer, n in enumerate(kept):
                k, v = kv.layer_tokens(layer, spec.dtype, device)  # [n, Hkv, D] each
                s = torch.arange(start, start + n, device=device)
                cache = self.kv_cache.layer(layer)
                cache[table[s // bs], 0, s % bs] = k
                cache[table[s // bs], 1, s % bs] = v
        except CodecError as e:
            log.warning("%s: malformed KV payload (%s): recomputing", req.request_id, e)
            self._count_fallback("codec")
            return False
        region = req.num_prompt_tokens - start
        req.compacted = CompactedKV(start, slots, kept, region - slots)
        req.private_from_block = req.num_cached_blocks
        req.num_computed_tokens = req.num_prompt_tokens
        return True

    def _count_fallback(self, reason: str) -> None:
        fb = self.stats.compression_fallbacks
        fb[reason] = fb.get(reason, 0) + 1

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the step loop --------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        sampled = self.runner.execute(sched.chunks) if sched.chunks else {}
        outputs = self._postprocess(sched, sampled)
        if not self.requests:
            self.runner.backend.release()
        return outputs

    def _postprocess(self, sched: SchedulerOutput, sampled: dict[str, SampledToken]) -> list[RequestOutput]:
        self.stats.steps += 1
        self.stats.preemptions += len(sched.preempted)
        for _ in range(sched.compaction_lost):
            self._count_fallback("preempted")
        outputs = []
        for chunk in sched.chunks:
            req = chunk.request
            if req.num_computed_tokens < req.num_prompt_tokens:
                if req.num_computed_tokens == req.num_cached_tokens and req.num_preemptions == 0:
                    self._count_admission(req)
                self.stats.prefill_computed_tokens += chunk.num_new_tokens
            self.scheduler.commit(chunk)
            s = sampled.get(req.request_id)
            if s is None:
                continue
            req.append_token(s.token_id)
            if s.logprobs is not None:
                req.output_logprobs.append(s.logprobs)
            self.stats.generation_tokens += 1
            reason = self._stop_reason(req, s.token_id)
            if reason is not None:
                self._finish(req, reason)
            first = req.num_output_tokens == 1 and req.prompt_logprobs is not None
            outputs.append(self._output(req, s.token_id, s.logprobs, req.prompt_logprobs if first else None))
        return outputs

    def _finish(self, req: Request, reason: RequestStatus) -> None:
        self.scheduler.finish(req, reason)
        del self.requests[req.request_id]
        self.stats.finished[reason.value] = self.stats.finished.get(reason.value, 0) + 1

    def _count_admission(self, req: Request) -> None:
        self.stats.prompt_tokens += req.num_prompt_tokens
        self.stats.prefix_cache_query_tokens += req.num_prompt_tokens
        self.stats.prefix_cache_hit_tokens += req.num_cached_tokens

    def _stop_reason(self, req: Request, token: int) -> RequestStatus | None:
        p = req.params
        if req.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids or (not p.ignore_eos and token in self.model_config.eos_token_ids):
                return RequestStatus.FINISHED_STOPPED
        if req.num_output_tokens >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def _output(
        req: Request, token: int, logprobs: TokenLogprobs | None, prompt_logprobs: list[TokenLogprobs | None] | None = None
    ) -> RequestOutput:
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=[token],
            new_logprobs=[logprobs] if logprobs is not None else [],
            finished=req.status.finished,
            finish_reason=req.status.value if req.status.finished else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=req.num_output_tokens,
            prompt_logprobs=prompt_logprobs,
            # Seeded random sampling: the RNG travels with each output so that another
            # worker can continue the request exactly (migration after a worker death).
            rng_state=rng_state_bytes(req.generator) if req.params.seed is not None and not req.params.greedy else None,
        )

    # ---- convenience ----------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Run prompts to completion as one continuous batch; output token ids each."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"gen-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, plist):
            self.add_request(rid, prompt, p)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while any(rid in self.requests for rid in ids):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id] += out.new_token_ids
        return [results[rid] for rid in ids]
