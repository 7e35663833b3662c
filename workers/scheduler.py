"""Continuous batching with chunked prefill, prefix reuse and preemption.

Every step has a token budget. Running requests go first, in arrival order: a
decoding request takes one token, a request still in prefill takes the next chunk of
its prompt. Then waiting requests are admitted (reusing their cached prefix) while
budget, batch slots and KV blocks last. So prefill and decode tokens share a step,
and a long prompt never stalls the decodes for more than one chunk.

When a running request needs a block and none is free, the most recently admitted
running request is preempted: its blocks are freed (cached ones stay in the prefix
cache) and it goes back to the front of the queue to be recomputed later. A request
whose KV was compacted is recomputed at full size (its compression is lost, counted).

A request whose prompt KV comes from another worker enters through ``add_remote``
(state WAITING_FOR_REMOTE_KV, its blocks already reserved) and leaves that state
through ``remote_kv_arrived`` (to running, at its true position) or
``remote_kv_failed`` (to waiting: it is recomputed here). Nothing else writes the
scheduler's queues.

Block accounting counts KV slots (``Request.num_kv_tokens``), not positions.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
from workers.config import EngineConfig
from workers.request import Request, RequestStatus


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_new_tokens: int  # tokens computed this step, from request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the known tokens (sample one more)."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    compaction_lost: int = 0  # preempted requests whose compacted KV is recomputed at full size

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)


class Scheduler:
    def __init__(self, config: EngineConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.waiting_remote: dict[str, Request] = {}  # WAITING_FOR_REMOTE_KV, blocks reserved
        self.num_preemptions = 0
        # Called with a request's queue time (seconds waiting before it first ran).
        self.on_first_scheduled: Callable[[float], None] | None = None

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def add_remote(self, req: Request) -> None:
        """A request whose blocks are reserved and whose KV another worker computes."""
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.waiting_remote[req.request_id] = req

    def remote_kv_arrived(self, req: Request) -> None:
        """Its KV is installed (``num_computed_tokens`` set): decode it from now on."""
        del self.waiting_remote[req.request_id]
        req.status = RequestStatus.RUNNING
        self.running.append(req)

    def remote_kv_failed(self, req: Request) -> None:
        """Its KV never came: free the reservation and compute the prompt here."""
        del self.waiting_remote[req.request_id]
        self.bm.free(req.block_ids)
        req.reset_kv()
        req.num_cached_tokens = -1
        req.status = RequestStatus.WAITING
        self.waiting.append(req)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def growth_blocks(self, cap_tokens: int) -> int:
        """Blocks the requests held here may still take before they end, each counted
        for at most ``cap_tokens`` more output tokens (side-effect free). A decode
        engine admits a reservation only when the free blocks cover this as well, so
        that a running sequence never has to be preempted (and recomputed in full) to
        make room for a newer one (SGLang's decode side keeps a like reserve:
        ``num_reserved_decode_tokens`` per running, transferring and waiting request)::

            free blocks >= new request's blocks + its growth + growth_blocks(cap)

        Running: the tokens still to enter its KV (the sampled one not yet computed,
        then its remaining output, capped). Reserved (KV on its way): its whole
        output, capped, in whole blocks (at most one block more than it needs).
        Waiting (preempted, or recomputed after a failed transfer): everything, since
        it holds nothing now."""
        if cap_tokens <= 0:
            return 0
        bs = self.bm.block_size
        total = 0
        for r in self.running:
            ahead = r.num_tokens - r.num_computed_tokens + min(max(0, r.params.max_tokens - r.num_output_tokens), cap_tokens)
            total += max(0, self.bm.blocks_for(r.num_kv_tokens + ahead) - len(r.block_ids))
        for r in self.waiting_remote.values():
            total += -(-min(r.params.max_tokens, cap_tokens) // bs)
        for r in self.waiting:
            total += self.bm.blocks_for(r.num_tokens + min(max(0, r.params.max_tokens - r.num_output_tokens), cap_tokens))
        return total

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget, self.config.chunk_size)
            need = self.bm.blocks_for(req.num_kv_tokens + n) - len(req.block_ids)
            while not self.bm.can_allocate(need):
                victim = self.running.pop()
                out.compaction_lost += victim.compacted is not None or victim.private_from_block is not None
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is req:
                    break
            else:
                req.block_ids += self.bm.allocate(need)
                out.chunks.append(ScheduledChunk(req, n))
                budget -= n
                i += 1
                continue
            break  # req itself was preempted: nothing after it is left in running

        if out.preempted:
            return out  # memory is tight: admit nobody new this step
        computing = self._blocks_being_computed() if self.waiting else set()  # none to admit: skip the scan
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            req = self.waiting[0]
            # A full prefix hit still recomputes the last block: one token must run
            # through the model to produce logits (more if the request needs them).
            usable = max(0, req.num_tokens - req.min_uncached_tokens) // self.bm.block_size
            prefix = self.bm.match_prefix(req.block_hashes[:usable], req.token_ids, req.root_hash)
            if prefix.num_blocks < usable and req.block_hashes[prefix.num_blocks] in computing:
                # Its next block is being computed by a running request (a burst sharing
                # a prompt, or a turn placed here while the previous one still prefills):
                # admitted now, it would compute that prefix a second time. It waits
                # (FIFO kept) until the block is cached, at most that prefill's length.
                break
            num_cached = prefix.num_blocks * self.bm.block_size
            n = min(req.num_tokens - num_cached, budget, self.config.chunk_size)
            need = self.bm.blocks_for(num_cached + n) - prefix.num_blocks
            if not self.bm.can_allocate(need, prefix):
                break
            self.waiting.popleft()
            req.block_ids = self.bm.allocate(need, prefix)
            req.num_computed_tokens = num_cached
            req.num_cached_blocks = prefix.num_blocks
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_cached
                req.first_scheduled_time = time.monotonic()
                if self.on_first_scheduled is not None:
                    self.on_first_scheduled(req.first_scheduled_time - req.arrival_time)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            out.chunks.append(ScheduledChunk(req, n))
            budget -= n
            computing |= self._uncached_prompt_blocks(req)
        return out

    def _blocks_being_computed(self) -> set:
        """Hashes of the full prompt blocks running requests have yet to cache."""
        out: set = set()
        for r in self.running:
            out |= self._uncached_prompt_blocks(r)
        return out

    def _uncached_prompt_blocks(self, req: Request) -> set:
        if not self.config.enable_prefix_caching:
            return set()
        end = req.num_prompt_tokens // self.bm.block_size
        if req.private_from_block is not None:  # lossy blocks are never cached: nobody waits on them
            end = min(end, req.private_from_block)
        return set(req.block_hashes[req.num_cached_blocks:end])

    def _preempt(self, req: Request) -> None:
        self.bm.free(req.block_ids)
        req.reset_kv()
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def commit(self, chunk: ScheduledChunk) -> None:
        """After the step ran: the chunk's KV is in the cache; register full blocks."""
        req = chunk.request
        req.num_computed_tokens += chunk.num_new_tokens
        full = req.num_computed_tokens // self.bm.block_size
        if req.private_from_block is not None:  # lossy KV from here on: never shared
            full = min(full, req.private_from_block)
        if full > req.num_cached_blocks:
            self.bm.cache_blocks(req.block_ids, req.block_hashes, req.num_cached_blocks, full, req.token_ids, req.root_hash)
            req.num_cached_blocks = full

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Remove a request (finished or aborted) and free its blocks."""
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.waiting_remote[req.request_id]
        elif not req.status.finished:
            self.waiting.remove(req)
        if req.block_ids:
            self.bm.free(req.block_ids)
            req.block_ids = []
        req.status = status
