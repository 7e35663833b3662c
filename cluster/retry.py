"""The retry rules of one request: what the cluster does after each kind of failure.
This is the only place that decides; ``KVRelayCluster.generate`` carries it out.

| failure                             | where                  | tokens sent to caller | what happens                                                        |
| ----------------------------------- | ---------------------- | --------------------- | ------------------------------------------------------------------- |
| CapacityError                       | reserve on D           | 0                     | next decode worker by the router's policy; none has room: wait in the pool's admission queue (FIFO) |
| no healthy prefill or decode worker | placement              | 0, fresh request      | one of the pool's workers may come back (Ray restarts left): wait in the admission queue (FIFO) for it; none can: fail: NoWorkerError (503) |
| no healthy decode worker            | placement              | retry / migration     | wait in the admission queue (retries first) for one to come up      |
| queue full / queue wait > deadline  | admission              | any                   | fail: AdmissionRejected (503 + Retry-After)                         |
| WorkerDiedError / TimeoutError      | prefill on P           | any                   | no retry: D recomputes the prompt itself; P is marked down          |
| transfer failed or late             | P → D                  | any                   | no retry: D recomputes the prompt itself                            |
| WorkerDiedError / TimeoutError      | reserve on D, stream   | 0                     | RETRY: same prompt, another D (the failed one excluded), queued first |
| WorkerDiedError / TimeoutError      | stream from D          | > 0                   | MIGRATE: prompt + tokens sent become the prompt, max_tokens and min_tokens shrink by them, the sampling RNG carried; another D, queued first |
| any retryable failure               | after ``max_attempts`` | any                   | fail with that error (WorkerDiedError / TimeoutError: 503)          |
| ValueError, LayoutMismatchError     | anywhere               | any                   | fail (400 / 500): retrying cannot help                              |

A dead worker is marked down at once (its pool's probe brings it back after Ray
restarts it, and then it may take the retry: with one decode worker, the request waits
for its restart; with one prefill worker, fresh requests wait for its restart); a
worker that timed out is avoided by this request's later attempts while another is up.
Every wait is the admission queue's: bounded (``admission.max_queued``) and within its
deadline (``admission.queue_timeout_s``), then 503 + Retry-After.
Placement on every attempt goes through the same chooser (the router's policy)."""

from __future__ import annotations

import enum

from cluster.worker_api import WorkerDiedError


class Step(enum.Enum):
    RETRY = "retry"  # from scratch on another worker
    MIGRATE = "migrate"  # continue from the tokens already sent, on another worker
    FAIL = "fail"


def next_step(error: BaseException, tokens_sent: int, attempts: int, max_attempts: int) -> Step:
    """What to do after ``error`` ended attempt number ``attempts`` (1-based) of a
    request that had sent ``tokens_sent`` tokens to its caller."""
    if not isinstance(error, (WorkerDiedError, TimeoutError)) or attempts >= max_attempts:
        return Step.FAIL
    return Step.MIGRATE if tokens_sent > 0 else Step.RETRY
