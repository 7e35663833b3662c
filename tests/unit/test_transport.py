"""The transport contract on the in-process transport, and fault injection on top of it.

The UCX transport is held to the same contract across processes in
tests/integration/test_ucx_transport.py.
"""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from cluster.transport import FaultyTransport, InProcessTransport, TransferError, make_transport

T = 5.0  # generous deadline for transfers that should succeed
SHORT = 0.15  # deadline for transfers that should time out


@pytest.fixture
def pair():
    a, b = InProcessTransport(), InProcessTransport()
    yield a, b
    a.close()
    b.close()


def reason(fut, timeout: float = T) -> str:
    err = fut.exception(timeout)
    assert isinstance(err, TransferError), err
    return err.reason


def pattern(nbytes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


# ---- delivery ----------------------------------------------------------------------------


def test_send_before_recv(pair):
    a, b = pair
    msg = pattern(1000, 1)
    assert a.send(b.address, 7, msg, T).result(T) is None  # completes with no recv posted
    msg[:] = 0  # the queued message is a copy: the sender may reuse its buffer at once
    out = np.zeros(1000, np.uint8)
    assert b.recv(7, out, T).result(T) == 1000
    np.testing.assert_array_equal(out, pattern(1000, 1))


def test_recv_before_send(pair):
    a, b = pair
    out = torch.zeros(256, dtype=torch.uint8)
    fut = b.recv(2**64 - 1, out, T)  # the largest tag
    assert not fut.done()
    a.send(b.address, 2**64 - 1, bytes(range(256)), T).result(T)
    assert fut.result(T) == 256
    assert out.tolist() == list(range(256))


def test_smaller_message_reports_its_size_and_leaves_the_rest(pair):
    a, b = pair
    out = np.full(10, 0xEE, np.uint8)
    fut = b.recv(3, out, T)
    a.send(b.address, 3, b"abc", T)
    assert fut.result(T) == 3
    assert bytes(out[:3]) == b"abc" and (out[3:] == 0xEE).all()


def test_many_tags_interleaved_out_of_order(pair):
    a, b = pair
    rng = random.Random(0)
    tags = [rng.getrandbits(64) for _ in range(64)]
    payloads = {tag: pattern(100 + i, i) for i, tag in enumerate(tags)}
    outs = {tag: np.zeros(200, np.uint8) for tag in tags}
    recv_order, send_order = tags[:], tags[:]
    rng.shuffle(recv_order)
    rng.shuffle(send_order)
    futs = {}
    for tag in recv_order[:32]:  # half the recvs before any send
        futs[tag] = b.recv(tag, outs[tag], T)
    for i, tag in enumerate(send_order):
        a.send(b.address, tag, payloads[tag], T)
        if i % 2:  # and the rest interleaved with the sends
            late = recv_order[32 + i // 2]
            futs[late] = b.recv(late, outs[late], T)
    for tag in tags:
        n = len(payloads[tag])
        assert futs[tag].result(T) == n
        np.testing.assert_array_equal(outs[tag][:n], payloads[tag])


def test_same_tag_twice_is_received_in_order(pair):
    a, b = pair
    a.send(b.address, 9, b"first", T)
    a.send(b.address, 9, b"second", T)
    out1, out2 = np.zeros(8, np.uint8), np.zeros(8, np.uint8)
    assert b.recv(9, out1, T).result(T) == 5 and b.recv(9, out2, T).result(T) == 6
    assert bytes(out1[:5]) == b"first" and bytes(out2[:6]) == b"second"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_torch_tensors_round_trip_bit_exactly(pair, dtype):
    a, b = pair
    nbytes = 4 * 3 * 64 * 8
    # Random bit patterns, so NaN payloads, denormals and -0.0 are in there too.
    src = torch.from_numpy(pattern(nbytes, 3)).view(dtype).reshape(4, 3, -1)
    dst = torch.empty_like(src)
    fut = b.recv(11, dst, T)
    a.send(b.address, 11, src, T).result(T)
    assert fut.result(T) == nbytes
    assert torch.equal(dst.view(torch.uint8), src.view(torch.uint8))


def test_numpy_and_views_round_trip(pair):
    a, b = pair
    src = np.random.default_rng(4).standard_normal((8, 16)).astype(np.float32)
    dst = np.zeros((2, 64), np.float32)  # another shape, same byte size
    fut = b.recv(12, dst, T)
    a.send(b.address, 12, memoryview(src), T)
    assert fut.result(T) == src.nbytes
    assert dst.tobytes() == src.tobytes()
    cache = torch.zeros(4, 2, 16, dtype=torch.float32)  # receive straight into a slice of a cache
    fut = b.recv(13, cache[1], T)
    a.send(b.address, 13, torch.arange(32, dtype=torch.float32), T)
    assert fut.result(T) == 128
    assert cache[1].flatten().tolist() == list(range(32)) and not cache[0].any() and not cache[2].any()


def test_empty_message(pair):
    a, b = pair
    fut = b.recv(14, np.zeros(4, np.uint8), T)
    a.send(b.address, 14, b"", T)
    assert fut.result(T) == 0


# ---- failures ------------------------------------------------------------------------------


def test_oversized_message_fails_with_size(pair):
    a, b = pair
    out = np.zeros(4, np.uint8)
    fut = b.recv(20, out, T)
    assert a.send(b.address, 20, b"too long", T).result(T) is None  # the sender is not told
    assert reason(fut) == "size"
    assert b.messages_received == 0
    a.send(b.address, 21, b"12345", T)  # also when the message was queued first
    assert reason(b.recv(21, out, T)) == "size"


def test_recv_times_out_within_its_deadline(pair):
    a, b = pair
    out = np.zeros(4, np.uint8)
    start = time.monotonic()
    fut = b.recv(30, out, SHORT)
    assert reason(fut) == "timeout"
    assert SHORT <= time.monotonic() - start < SHORT + 0.5
    a.send(b.address, 30, b"late", T).result(T)  # a late message never lands in that buffer
    assert not out.any()
    assert b.recv(30, out, T).result(T) == 4  # it waits for the next recv instead


def test_close_fails_pending_and_later_calls(pair):
    a, b = pair
    pending = [b.recv(40 + i, np.zeros(4, np.uint8), 60.0) for i in range(3)]
    b.close()
    b.close()  # idempotent
    assert [reason(f) for f in pending] == ["closed"] * 3
    assert reason(b.recv(50, np.zeros(4, np.uint8), T)) == "closed"
    assert reason(b.send(a.address, 50, b"x", T)) == "closed"
    assert reason(a.send(b.address, 50, b"x", T)) == "peer"  # gone from the registry


def test_unknown_peer(pair):
    a, _ = pair
    assert reason(a.send(b"\x00" * 16, 1, b"x", T)) == "peer"


def test_futures_cannot_be_cancelled(pair):
    _, b = pair
    fut = b.recv(60, np.zeros(4, np.uint8), SHORT)
    assert fut.cancel() is False
    assert reason(fut) == "timeout"


def test_callbacks_may_call_back_into_the_transport(pair):
    """A done-callback that sends (an ack) must not deadlock on transport locks."""
    a, b = pair
    ack = np.zeros(3, np.uint8)
    ack_f = a.recv(71, ack, T)
    fut = b.recv(70, np.zeros(4, np.uint8), T)
    fut.add_done_callback(lambda f: b.send(a.address, 71, b"ack", T))
    a.send(b.address, 70, b"data", T)
    assert ack_f.result(T) == 3 and bytes(ack) == b"ack"


def test_sends_from_many_threads(pair):
    a, b = pair
    outs = [np.zeros(64, np.uint8) for _ in range(200)]
    futs = [b.recv(tag, outs[tag], T) for tag in range(200)]

    def sender(tags):
        for tag in tags:
            a.send(b.address, tag, np.full(64, tag % 256, np.uint8), T)

    threads = [threading.Thread(target=sender, args=(range(i, 200, 4),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [f.result(T) for f in futs] == [64] * 200
    assert all((out == tag % 256).all() for tag, out in enumerate(outs))
    assert (a.messages_sent, b.messages_received) == (200, 200)


def test_counters_are_exact(pair):
    a, b = pair
    sizes = [1, 100, 4096, 0]
    for tag, n in enumerate(sizes):
        fut = b.recv(tag, np.zeros(4096, np.uint8), T)
        a.send(b.address, tag, np.zeros(n, np.uint8), T).result(T)
        fut.result(T)
    reason(b.recv(99, np.zeros(1, np.uint8), SHORT))  # failures do not count
    a.send(b.address, 98, b"12", T)
    reason(b.recv(98, np.zeros(1, np.uint8), T))
    assert (a.bytes_sent, a.messages_sent) == (sum(sizes) + 2, 5)
    assert (b.bytes_received, b.messages_received) == (sum(sizes), 4)
    assert (a.bytes_received, a.messages_received, b.bytes_sent, b.messages_sent) == (0, 0, 0, 0)


# ---- bad calls raise at once ----------------------------------------------------------------


def test_bad_calls_raise(pair):
    a, b = pair
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        a.send(b.address, 2**64, b"x", T)
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        b.recv(-1, np.zeros(1, np.uint8), T)
    with pytest.raises(ValueError, match="timeout_s"):
        b.recv(1, np.zeros(1, np.uint8), 0)
    with pytest.raises(ValueError, match="contiguous"):
        a.send(b.address, 1, torch.zeros(4, 4).t(), T)
    with pytest.raises(TypeError, match="preallocated"):
        b.recv(1, bytearray(4), T)
    with pytest.raises(ValueError, match="read-only"):
        b.recv(1, np.frombuffer(b"abcd", np.uint8), T)
    with pytest.raises(TypeError, match="list"):
        a.send(b.address, 1, [1, 2, 3], T)


def test_transfer_error_pickles():
    err = pickle.loads(pickle.dumps(TransferError("timeout", "slow link")))
    assert (err.reason, err.message, str(err)) == ("timeout", "slow link", "timeout: slow link")
    with pytest.raises(ValueError, match="reason"):
        TransferError("oops", "x")


def test_make_transport():
    t = make_transport("inprocess")
    assert isinstance(t, InProcessTransport) and t.name == "inprocess"
    t.close()
    with pytest.raises(ValueError, match="ucx, inprocess"):
        make_transport("tcp")


def test_import_does_not_need_ucxx():
    code = "import sys, cluster.transport; sys.exit('ucxx' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ---- fault injection ------------------------------------------------------------------------


def test_injected_failure_only_for_matching_tags(pair):
    a, b = pair
    faulty = FaultyTransport(a, fail_tags=lambda tag: tag % 2 == 1)
    assert (faulty.name, faulty.address) == ("inprocess", a.address)
    assert reason(faulty.send(b.address, 1, b"x", T)) == "injected"
    out = np.zeros(1, np.uint8)
    fut = b.recv(2, out, T)
    faulty.send(b.address, 2, b"y", T).result(T)
    assert fut.result(T) == 1 and bytes(out) == b"y"
    assert (faulty.injected, faulty.messages_sent, a.messages_sent) == (1, 1, 1)


def test_dropped_send_succeeds_and_the_receiver_times_out(pair):
    a, b = pair
    faulty = FaultyTransport(a, drop=True)  # no fail_tags: every send
    fut = b.recv(5, np.zeros(4, np.uint8), SHORT)
    assert faulty.send(b.address, 5, b"lost", T).result(T) is None
    assert reason(fut) == "timeout"
    assert (faulty.injected, faulty.messages_sent) == (1, 0)


def test_delayed_send_arrives_late(pair):
    a, b = pair
    faulty = FaultyTransport(a, delay_s=0.3)
    out = np.zeros(4, np.uint8)
    start = time.monotonic()
    early = b.recv(6, out, 0.1)
    assert reason(early) == "timeout"  # too impatient
    fut = b.recv(6, out, T)
    faulty.send(b.address, 6, b"slow", T).result(T)
    assert time.monotonic() - start >= 0.3
    assert fut.result(T) == 4 and bytes(out) == b"slow"
    faulty.close()


def test_delay_past_the_send_deadline(pair):
    a, b = pair
    faulty = FaultyTransport(a, delay_s=0.3)
    fut = b.recv(7, np.zeros(4, np.uint8), T)
    assert reason(faulty.send(b.address, 7, b"late", 0.1)) == "timeout"
    assert fut.result(T) == 4  # still delivered, late
    faulty.close()


def test_close_fails_delayed_sends(pair):
    a, b = pair
    faulty = FaultyTransport(a, delay_s=10.0)
    fut = faulty.send(b.address, 8, b"x", 30.0)
    faulty.close()
    assert reason(fut) == "closed"
    assert reason(a.send(b.address, 8, b"x", T)) == "closed"  # closes the inner one too
