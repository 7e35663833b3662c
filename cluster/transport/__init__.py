"""KV transport: a generic mover of tagged contiguous buffers between processes.

    from cluster.transport import make_transport, TransferError
    t = make_transport("ucx")                     # or "inprocess"
    f = t.recv(tag, torch.empty(n, dtype=torch.uint8), timeout_s=5.0)   # on the receiver
    t.send(receiver_address, tag, tensor, timeout_s=5.0)                 # on the sender
    nbytes = f.result()   # or: await asyncio.wrap_future(f)

The contract is in ``base.py``; ``ucx.py`` is the real one (ucxx, imported only when a
UcxTransport is built), ``inprocess.py`` the one for tests and single-process setups,
``faults.py`` a wrapper that breaks chosen sends.
"""

from __future__ import annotations

from cluster.transport.base import KVTransport, TransferCounters, TransferError
from cluster.transport.faults import FaultyTransport
from cluster.transport.inprocess import InProcessTransport

KINDS = ("ucx", "inprocess")


def make_transport(kind: str, **options) -> KVTransport:
    """``options`` go to the transport's constructor (``UcxTransport(error_handling=...)``)."""
    if kind == "ucx":
        from cluster.transport.ucx import UcxTransport

        return UcxTransport(**options)
    if kind == "inprocess":
        return InProcessTransport(**options)
    raise ValueError(f"unknown transport kind {kind!r}; choose one of {', '.join(KINDS)}")


__all__ = [
    "KINDS", "FaultyTransport", "InProcessTransport", "KVTransport", "TransferCounters", "TransferError",
    "make_transport",
]
