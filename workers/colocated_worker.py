"""The colocated worker: prefill and decode on one engine (the baseline every
disaggregated result is compared against).

A request with a lossless payload runs as one engine request, no handoff. A request
with a compressing preset runs the disaggregated path against this worker itself:
reserve (the decode side) → prefill under a second request id (the prefill side, which
selects, quantizes and sends each layer over the in-process transport) → install and
decode. Same codecs, same install, no wire: "compressed vs full" is then measurable
without disaggregation too."""

from __future__ import annotations

from collections.abc import AsyncIterator

from workers.decode_worker import DecodeWorker
from cluster.worker_api import RequestOutput
from workers.prefill_worker import PrefillWorker
from workers.sampling_params import SamplingParams


class ColocatedWorker(PrefillWorker, DecodeWorker):
    async def generate(
        self, request_id: str, prompt: list[int], params: SamplingParams, compression: str | None = None,
        rng_state: bytes | None = None,
    ) -> AsyncIterator[RequestOutput]:
        _, settings = self.spec.compression.resolve(compression)
        if settings.lossless:
            async for out in super().generate(request_id, prompt, params, rng_state=rng_state):
                yield out
            return
        desc = await self.reserve(request_id, prompt, params, self.layout, compression)
        finished = False
        try:
            first = await self.prefill(f"{request_id}#prefill", prompt, params, desc, rng_state)
            yield RequestOutput(request_id, [first.first_token], [first.first_logprobs] if first.first_logprobs else [],
                                False, None, first.num_prompt_tokens, first.num_cached_tokens, 1, first.prompt_logprobs)
            async for out in self.decode(request_id, first.first_token, first.first_logprobs, first.rng_state):
                finished = out.finished
                yield out
        finally:
            if not finished:
                await self.abort(request_id)
