"""Byte views of the buffers callers hand to a transport.

A transport moves bytes, not dtypes: every buffer is reinterpreted as a flat uint8 view
of the same memory (no copy). That is also how bfloat16 tensors travel, since numpy has
no bfloat16. Host memory becomes a numpy uint8 array (what ucxx reads through the buffer
protocol); CUDA memory stays a torch uint8 tensor, which UCX reads through
``__cuda_array_interface__`` with no host staging.
"""

from __future__ import annotations

from typing import Any, Union

import numpy as np
import torch

Frame = Union[np.ndarray, torch.Tensor]  # 1-D uint8; torch only for CUDA memory


def frame(buf: Any, *, writable: bool) -> Frame:
    """A 1-D uint8 view sharing ``buf``'s memory. Raises TypeError/ValueError for what a
    transport cannot use: non-contiguous memory, or a read-only buffer to receive into."""
    if isinstance(buf, torch.Tensor):
        if not buf.is_contiguous():
            raise ValueError(f"tensor must be contiguous (shape {tuple(buf.shape)}, stride {buf.stride()})")
        flat = buf.detach().reshape(-1).view(torch.uint8)  # [nbytes] uint8, same storage
        return flat if flat.is_cuda else flat.numpy()
    if isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError(f"numpy array must be C-contiguous (shape {buf.shape})")
        if writable and not buf.flags.writeable:
            raise ValueError("receive buffer is read-only")
        return buf.reshape(-1).view(np.uint8)
    if isinstance(buf, (bytes, bytearray, memoryview)):
        if writable:
            raise TypeError("recv needs a preallocated torch tensor or numpy array")
        view = memoryview(buf)
        if not view.contiguous:
            raise ValueError("memoryview must be contiguous")
        return np.frombuffer(view, dtype=np.uint8) if view.nbytes else np.empty(0, np.uint8)
    raise TypeError(f"cannot transfer a {type(buf).__name__}; use a torch tensor, numpy array or bytes")


def is_cuda(f: Frame) -> bool:
    return isinstance(f, torch.Tensor) and f.is_cuda


def nbytes(f: Frame) -> int:
    return int(f.numel()) if isinstance(f, torch.Tensor) else int(f.nbytes)


def ready_event(f: Frame):
    """For CUDA memory: an event recorded on the caller's current stream, so the transport
    can wait (without blocking the caller) until the kernels writing ``f`` have finished.
    None for host memory."""
    if not is_cuda(f):
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(f.device))
    return event


def copy_into(dst: Frame, src: Frame) -> None:
    """dst[:len(src)] = src, host or device on either side (the in-process transport)."""
    n = nbytes(src)
    if not is_cuda(dst) and not is_cuda(src):
        np.copyto(dst[:n], src)
        return
    if not is_cuda(src) and not src.flags.writeable:
        src = src.copy()  # torch refuses to wrap read-only memory (bytes)
    as_torch = [t if isinstance(t, torch.Tensor) else torch.from_numpy(t) for t in (dst, src)]
    as_torch[0][:n].copy_(as_torch[1])


def owned_copy(src: Frame) -> Frame:
    """A private copy of ``src`` on the same device (a message queued before its recv)."""
    return src.clone() if isinstance(src, torch.Tensor) else src.copy()
