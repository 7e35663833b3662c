"""The UCX transport for real: two Ray actors (two processes) exchanging tagged buffers,
as the prefill and decode workers do in production; plus the contract on two UCX
transports inside one process.

Payloads are generated from seeds on each side and compared by SHA-256, so the 64 MB
buffer never travels through Ray itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import sys
import time

import numpy as np
import pytest

os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")  # before ucxx is first imported
pytest.importorskip("ucxx")
ray = pytest.importorskip("ray")

from cluster.transport import TransferError  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

T = 20.0


def payload(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def digest(buf: np.ndarray) -> str:
    return hashlib.sha256(memoryview(buf)).hexdigest()


class Peer:
    """One side, in its own process: a UcxTransport plus bookkeeping the test can query.
    Outcomes are ("ok", nbytes, sha256 of what arrived) or ("error", reason, elapsed_s)."""

    def __init__(self) -> None:
        from cluster.transport import make_transport

        self.transport = make_transport("ucx")
        self.posted: dict[int, tuple] = {}

    def address(self) -> bytes:
        return self.transport.address

    def pid(self) -> int:
        return os.getpid()

    def post(self, tags: list[int], capacity: int, timeout_s: float = T) -> None:
        for tag in tags:
            buf, start = np.zeros(capacity, np.uint8), time.monotonic()
            self.posted[tag] = (self.transport.recv(tag, buf, timeout_s), buf, start)

    def results(self, tags: list[int]) -> list[tuple]:
        out = []
        for tag in tags:
            fut, buf, start = self.posted.pop(tag)
            try:
                n = fut.result()
                out.append(("ok", n, digest(buf[:n])))
            except TransferError as e:
                out.append(("error", e.reason, time.monotonic() - start))
        return out

    def send(self, peer: bytes, sends: list[tuple[int, int, int]], timeout_s: float = T) -> list[tuple]:
        """sends: (tag, nbytes, seed). All go out at once; returns their outcomes."""
        started = []
        for tag, n, seed in sends:
            buf, start = payload(n, seed), time.monotonic()
            started.append((self.transport.send(peer, tag, buf, timeout_s), start))
        out = []
        for fut, start in started:
            try:
                fut.result()
                out.append(("ok",))
            except TransferError as e:
                out.append(("error", e.reason, time.monotonic() - start))
        return out

    def counters(self) -> tuple[int, int, int, int]:
        t = self.transport
        return t.bytes_sent, t.messages_sent, t.bytes_received, t.messages_received

    def close(self) -> None:
        self.transport.close()


@pytest.fixture(scope="module")
def peers():
    # Ray workers cannot import this module by the name pytest gave it: ship Peer by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True,
             runtime_env={"env_vars": {"UCX_WARN_UNUSED_ENV_VARS": "n"}})
    actor = ray.remote(num_cpus=0.5)(Peer)
    sender, receiver = actor.remote(), actor.remote()
    addresses = ray.get([sender.address.remote(), receiver.address.remote()])
    assert ray.get(sender.pid.remote()) != ray.get(receiver.pid.remote())
    yield actor, sender, receiver, addresses[1]
    ray.shutdown()


def test_many_tags_out_of_order(peers):
    _, sender, receiver, raddr = peers
    rng = random.Random(1)
    # sizes on both sides of UCX's eager/rendezvous switch (8 KiB)
    sends = [(rng.getrandbits(64), rng.choice([1, 100, 8191, 8192, 50_000, 300_000]), seed) for seed in range(120)]
    tags = [tag for tag, _, _ in sends]
    shuffled = tags[:]
    rng.shuffle(shuffled)
    ray.get(receiver.post.remote(shuffled[:60], 300_000))  # half posted before anything is sent
    sent = sender.send.remote(raddr, sends[::-1])  # sent in another order
    time.sleep(0.2)
    ray.get(receiver.post.remote(shuffled[60:], 300_000))  # the rest after
    assert ray.get(sent) == [("ok",)] * len(sends)
    got = ray.get(receiver.results.remote(tags))
    assert got == [("ok", n, digest(payload(n, seed))) for _, n, seed in sends]


def test_64mb_bit_exact(peers):
    _, sender, receiver, raddr = peers
    n = 64 << 20
    before = ray.get(receiver.counters.remote())
    ray.get(receiver.post.remote([0xC0FFEE], n))
    start = time.monotonic()
    assert ray.get(sender.send.remote(raddr, [(0xC0FFEE, n, 42)])) == [("ok",)]
    elapsed = time.monotonic() - start
    assert ray.get(receiver.results.remote([0xC0FFEE])) == [("ok", n, digest(payload(n, 42)))]
    after = ray.get(receiver.counters.remote())
    assert (after[2] - before[2], after[3] - before[3]) == (n, 1)
    print(f"64 MB in {elapsed:.2f}s including generating it")


def test_send_without_matching_recv_times_out_the_receiver(peers):
    _, sender, receiver, raddr = peers
    ray.get(receiver.post.remote([1001], 1 << 20, 1.0))  # waits for 1001; 1002/1003 arrive instead
    # A small (eager) send completes without a receiver; a large (rendezvous) one cannot.
    outcome = ray.get(sender.send.remote(raddr, [(1002, 100, 0), (1003, 1 << 20, 0)], 1.0))
    assert outcome[0] == ("ok",)
    assert outcome[1][:2] == ("error", "timeout") and 1.0 <= outcome[1][2] < 3.0
    [(status, why, elapsed)] = ray.get(receiver.results.remote([1001]))
    assert (status, why) == ("error", "timeout") and 1.0 <= elapsed < 3.0


def test_recv_whose_peer_never_sends(peers):
    _, _, receiver, _ = peers
    ray.get(receiver.post.remote([2001], 64, 0.5))
    [(status, why, elapsed)] = ray.get(receiver.results.remote([2001]))
    assert (status, why) == ("error", "timeout") and 0.5 <= elapsed < 2.5


def test_send_to_a_dead_peer_fails_and_the_sender_still_works(peers):
    actor, sender, receiver, raddr = peers
    doomed = actor.remote()
    doomed_addr = ray.get(doomed.address.remote())
    ray.get(doomed.post.remote([3001], 16))
    assert ray.get(sender.send.remote(doomed_addr, [(3001, 16, 0)])) == [("ok",)]
    ray.kill(doomed)
    time.sleep(0.5)
    # Without error_handling a dead peer surfaces as a timeout (or a shared-memory error).
    [outcome] = ray.get(sender.send.remote(doomed_addr, [(3002, 1 << 20, 0)], 2.0))
    assert outcome[:2] in (("error", "peer"), ("error", "timeout"))
    ray.get(receiver.post.remote([3003], 16))
    assert ray.get(sender.send.remote(raddr, [(3003, 16, 7)])) == [("ok",)]
    assert ray.get(receiver.results.remote([3003])) == [("ok", 16, digest(payload(16, 7)))]


def test_contract_in_one_process():
    """Two UCX transports in one process: sizes, timeouts, close, counters."""
    import torch

    from cluster.transport import make_transport

    a, b = make_transport("ucx"), make_transport("ucx")
    try:
        assert a.name == "ucx" and a.address != b.address
        src = torch.from_numpy(payload(3 * 64 * 2 * 10, 5)).view(torch.bfloat16).reshape(10, 2, 3, 32)
        dst = torch.empty_like(src)
        fut = b.recv(1, dst, T)
        assert a.send(b.address, 1, src, T).result(T) is None
        assert fut.result(T) == src.numel() * 2 and torch.equal(dst.view(torch.uint8), src.view(torch.uint8))

        small = np.full(10, 0xEE, np.uint8)
        a.send(b.address, 2, b"abc", T).result(T)  # before the recv
        assert b.recv(2, small, T).result(T) == 3 and bytes(small[:3]) == b"abc" and small[3] == 0xEE

        for n in (5, 100_000):  # eager and rendezvous; the sender is not told
            fut = b.recv(3 + n, np.zeros(4, np.uint8), T)
            assert a.send(b.address, 3 + n, np.zeros(n, np.uint8), T).result(T) is None
            assert fut.exception(T).reason == "size"

        start = time.monotonic()
        assert b.recv(4, np.zeros(4, np.uint8), 0.3).exception(T).reason == "timeout"
        assert 0.3 <= time.monotonic() - start < 1.0
        deadline = time.monotonic() + 2.0  # an unmatched recv is cancelled, its buffer released
        while b.lingering and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.lingering == 0

        assert (a.bytes_sent, a.messages_sent) == (src.numel() * 2 + 3 + 5 + 100_000, 4)
        assert (b.bytes_received, b.messages_received) == (src.numel() * 2 + 3, 2)  # failures do not count

        pending = b.recv(5, np.zeros(4, np.uint8), 60.0)
        b.close()
        b.close()
        assert pending.exception(T).reason == "closed"
        assert b.recv(6, np.zeros(4, np.uint8), T).exception(T).reason == "closed"
        # Without error_handling a closed peer surfaces as a timeout (or a shared-memory error).
        assert a.send(b.address, 7, np.zeros(1 << 20, np.uint8), 1.0).exception(T).reason in ("peer", "timeout")
    finally:
        a.close()
        b.close()


def test_error_handling_mode_reports_a_closed_peer_at_once():
    from cluster.transport import make_transport

    a, b = make_transport("ucx", error_handling=True), make_transport("ucx", error_handling=True)
    try:
        big = payload(1 << 20, 9)
        out = np.zeros_like(big)
        fut = b.recv(1, out, T)
        a.send(b.address, 1, big, T).result(T)
        assert fut.result(T) == big.nbytes and digest(out) == digest(big)
        b.close()
        start = time.monotonic()
        assert a.send(b.address, 2, big, T).exception(T).reason == "peer"
        assert time.monotonic() - start < 2.0
    finally:
        a.close()
        b.close()
