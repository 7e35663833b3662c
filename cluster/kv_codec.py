"""Payload quantizers for the KV shipped from a prefill worker to a decode worker.

The prompt suffix's KV crosses the network once per request, layer by layer, and that
transfer sits on the time-to-first-token path, so it may be shipped quantized. Each
layer's K and V for ``n`` tokens becomes ONE contiguous uint8 message (one transport
send per layer): a 16-byte header, then the quantizer's payload. Pure torch ops, so it
runs on CPU or CUDA, vectorized (it runs inside the prefill forward pass).

Payload layouts (n tokens, H KV heads, D head_dim; G = ceil(n / g), g = group_size):

  none   [K n,H,D raw_dtype][V n,H,D raw_dtype]                       2*n*H*D*itemsize
  int8   [K n,H,D int8][V n,H,D int8]
         [K scale n,H fp16][V scale n,H fp16]                         2*n*H*D + 4*n*H
  fp8    [K n,H,D e4m3fn][V n,H,D e4m3fn]
         [K scale H f32][V scale H f32]                               2*n*H*D + 8*H
  int4   [K codes n*H*D/2 u8][V codes n*H*D/2 u8]   (n,H,D order; low nibble first)
         [K min G,H,D fp16][K scale G,H,D fp16]     (per channel, g tokens a group)
         [V min n,H,D/g fp16][V scale n,H,D/g fp16] (per token, g channels a group)
                                                    n*H*D + 4*G*H*D + 4*n*H*(D/g)

int4 needs D % g == 0 (so D is even and the codes fill whole bytes); the last key group
may be partial: encode pads the token axis with copies of the last token (min/max
unchanged) and ships codes for the n real tokens only. fp16 mins/scales assume the
KV is within fp16 range (|x| < 65504), as any sane activation is.

Header, little endian: magic u32 | codec id u32 | layer u32 | num_tokens u32. The codec
id is the quantizer kind in the low byte and its parameter above (int4: group size;
none: raw dtype), so a peer configured differently is refused, never misread.
"""

from __future__ import annotations

import math
import struct

import torch

LAYER_HEADER_BYTES = 16
LAYER_MAGIC = 0x4B56524C  # "LRVK" on the wire
_HEADER = struct.Struct("<IIII")
_TINY_F16 = 2.0**-24  # smallest positive fp16: a scale for all-zero groups, never 0
_RAW_DTYPES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}


class CodecError(ValueError):
    """A received layer message is malformed, short or not what this peer expects."""


def _f16(x: torch.Tensor, up: bool) -> torch.Tensor:
    """x (float32) as fp16 rounded toward +inf (up) or -inf: the result bounds x."""
    h = x.half()
    off = h.float() < x if up else h.float() > x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, math.inf if up else -math.inf)), h)


def _bytes(*ts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for t in ts])


class _Reader:
    """Consumes a payload front to back as typed tensors."""

    def __init__(self, payload: torch.Tensor):
        self.buf, self.off = payload, 0

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        nb = count * dtype.itemsize
        seg = self.buf[self.off : self.off + nb]
        self.off += nb
        if dtype.itemsize > 1 and seg.storage_offset() % dtype.itemsize:
            seg = seg.clone()  # a dtype view needs an aligned storage offset
        return seg.view(dtype)


class Quantizer:
    """Packs one layer's K and V [n, H, D] into exactly nbytes(n, H, D) uint8 bytes."""

    name: str
    kind: int  # low byte of the codec id
    param: int = 0

    @property
    def codec_id(self) -> int:
        return self.kind | (self.param << 8)

    def nbytes(self, num_tokens: int, num_heads: int, head_dim: int) -> int:
        raise NotImplementedError

    def encode(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload, num_tokens, num_heads, head_dim, dtype, device):
        raise NotImplementedError

    def _reader(self, payload: torch.Tensor, n: int, h: int, d: int, device) -> _Reader:
        need = self.nbytes(n, h, d)
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() < need:
            raise CodecError(f"{self.name}: need a 1-D uint8 payload of >= {need} bytes, "
                             f"got {tuple(payload.shape)} {payload.dtype}")
        return _Reader(payload[:need].to(device))

    def __repr__(self) -> str:
        return f"<Quantizer {self.name} codec_id={self.codec_id:#x}>"


class RawQuantizer(Quantizer):
    name, kind = "none", 0

    def __init__(self, raw_dtype: torch.dtype):
        if raw_dtype not in _RAW_DTYPES:
            raise ValueError(f"raw_dtype must be one of {list(_RAW_DTYPES)}, got {raw_dtype}")
        self.raw_dtype, self.param = raw_dtype, _RAW_DTYPES[raw_dtype]

    def nbytes(self, num_tokens, num_heads, head_dim):
        return 2 * num_tokens * num_heads * head_dim * self.raw_dtype.itemsize

    def encode(self, k, v):
        return _bytes(k.to(self.raw_dtype), v.to(self.raw_dtype))

    def decode(self, payload, num_tokens, num_heads, head_dim, dtype, device):
        r, shape = self._reader(payload, num_tokens, num_heads, head_dim, device), (num_tokens, num_heads, head_dim)
        m = math.prod(shape)
        return tuple(r.take(m, self.raw_dtype).view(shape).to(dtype) for _ in "kv")


class _ScaledQuantizer(Quantizer):
    """One byte a code, K codes then V codes, then K scales then V scales (int8, fp8)."""

    code_dtype: torch.dtype
    scale_dtype: torch.dtype
    _scale_shape: staticmethod  # (n, H) -> the scales' shape, broadcasting against [n, H, D]

    def nbytes(self, num_tokens, num_heads, head_dim):
        scales = math.prod(self._scale_shape(num_tokens, num_heads))
        return 2 * num_tokens * num_heads * head_dim + 2 * scales * self.scale_dtype.itemsize

    def encode(self, k, v):
        (qk, sk), (qv, sv) = self._q(k.float()), self._q(v.float())
        return _bytes(qk, qv, sk, sv)

    def decode(self, payload, num_tokens, num_heads, head_dim, dtype, device):
        r, shape = self._reader(payload, num_tokens, num_heads, head_dim, device), (num_tokens, num_heads, head_dim)
        sshape = self._scale_shape(num_tokens, num_heads)
        qk, qv = (r.take(math.prod(shape), self.code_dtype).view(shape).float() for _ in "kv")
        sk, sv = (r.take(math.prod(sshape), self.scale_dtype).view(sshape).float() for _ in "kv")
        return (qk * sk).to(dtype), (qv * sv).to(dtype)


class Int8Quantizer(_ScaledQuantizer):
    name, kind, code_dtype, scale_dtype = "int8", 1, torch.int8, torch.float16
    _scale_shape = staticmethod(lambda n, h: (n, h, 1))

    @staticmethod
    def _q(x: torch.Tensor):
        # Rounded up in fp16 so |x / scale| <= 127 always: the clamp never bites.
        scale = _f16((x.abs().amax(-1, keepdim=True) / 127).clamp_min(_TINY_F16), up=True)  # [n, H, 1]
        return (x / scale.float()).round().clamp(-127, 127).to(torch.int8), scale


class Fp8Quantizer(_ScaledQuantizer):
    name, kind, code_dtype, scale_dtype = "fp8", 2, torch.float8_e4m3fn, torch.float32
    _scale_shape = staticmethod(lambda n, h: (h, 1))
    _MAX = 448.0  # largest finite float8_e4m3fn

    def _q(self, x: torch.Tensor):
        amax = x.abs().amax(dim=(0, 2)) if x.shape[0] else x.new_zeros(x.shape[1])
        scale = (amax / self._MAX).clamp_min(1e-30)[:, None]  # [H, 1] f32
        # The clamp only absorbs float rounding of x/scale past 448 (CUDA casts it to NaN).
        return (x / scale).clamp(-self._MAX, self._MAX).to(torch.float8_e4m3fn), scale


class Int4Quantizer(Quantizer):
    """KIVI: keys per channel over token groups (outlier channels), values per token."""

    name, kind = "int4", 3

    def __init__(self, group_size: int):
        self.group_size = self.param = group_size

    def _check(self, head_dim: int) -> None:
        if head_dim % self.group_size:
            raise ValueError(f"int4: head_dim {head_dim} is not a multiple of group_size {self.group_size}")

    def nbytes(self, num_tokens, num_heads, head_dim):
        self._check(head_dim)
        g, groups = self.group_size, -(-num_tokens // self.group_size)
        return num_tokens * num_heads * head_dim + 4 * num_heads * (groups * head_dim + num_tokens * head_dim // g)

    @staticmethod
    def _q(xg: torch.Tensor, dim: int):
        # min rounded down, scale rounded up: min + 15*scale >= max, so codes cover the group.
        mn = _f16(xg.amin(dim, keepdim=True), up=False)
        scale = _f16(((xg.amax(dim, keepdim=True) - mn.float()) / 15).clamp_min(_TINY_F16), up=True)
        q = ((xg - mn.float()) / scale.float()).round().clamp(0, 15).to(torch.uint8)
        return q, mn, scale

    def encode(self, k, v):
        n, h, d = k.shape
        self._check(d)
        g, groups = self.group_size, -(-n // self.group_size)
        kf = k.float()
        if groups * g > n:  # copies of the last token leave the partial group's min/max as is
            kf = torch.cat([kf, kf[-1:].expand(groups * g - n, h, d)])
        qk, mk, sk = self._q(kf.view(groups, g, h, d), 1)
        qv, mv, sv = self._q(v.float().reshape(n, h, d // g, g), 3)
        codes = torch.cat([qk.reshape(-1)[: n * h * d], qv.reshape(-1)])  # n*h*d is even (d % g == 0)
        return torch.cat([codes[0::2] | (codes[1::2] << 4), _bytes(mk, sk, mv, sv)])

    def decode(self, payload, num_tokens, num_heads, head_dim, dtype, device):
        n, h, d, g = num_tokens, num_heads, head_dim, self.group_size
        r, groups = self._reader(payload, n, h, d, device), -(-n // g)
        packed = r.take(n * h * d, torch.uint8)
        codes = torch.stack([packed & 0xF, packed >> 4], -1).reshape(2, n, h, d).float()
        mk, sk = (r.take(groups * h * d, torch.float16).view(groups, h, d).float() for _ in "ms")
        mv, sv = (r.take(n * h * d // g, torch.float16).view(n, h, d // g, 1).float() for _ in "ms")
        k = (mk.repeat_interleave(g, 0)[:n] + codes[0] * sk.repeat_interleave(g, 0)[:n]).to(dtype)
        v = (mv + codes[1].view(n, h, d // g, g) * sv).view(n, h, d).to(dtype)
        return k, v


QUANTIZERS = ("none", "int8", "fp8", "int4")


def get_quantizer(name: str, *, raw_dtype: torch.dtype = torch.float32, group_size: int = 32) -> Quantizer:
    if not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even int (int4 packs two codes a byte), got {group_size!r}")
    if name == "none":
        return RawQuantizer(raw_dtype)
    if name == "int8":
        return Int8Quantizer()
    if name == "fp8":
        return Fp8Quantizer()
    if name == "int4":
        return Int4Quantizer(group_size)
    raise ValueError(f"unknown quantizer {name!r}; valid: {', '.join(QUANTIZERS)}")


def ratio_vs_16bit(q: Quantizer, num_tokens: int, num_heads: int, head_dim: int) -> float:
    """How many times smaller than K and V in a 16-bit dtype the payload is."""
    return (2 * num_tokens * num_heads * head_dim * 2) / q.nbytes(num_tokens, num_heads, head_dim)


def layer_message_bytes(q: Quantizer, num_tokens: int, num_heads: int, head_dim: int) -> int:
    return LAYER_HEADER_BYTES + q.nbytes(num_tokens, num_heads, head_dim)


def encode_layer(q: Quantizer, layer: int, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be [n, H, D], got {tuple(k.shape)} and {tuple(v.shape)}")
    payload = q.encode(k, v)
    # Built on CPU from host ints: no device sync; one small H2D copy when k is on CUDA.
    header = torch.frombuffer(bytearray(_HEADER.pack(LAYER_MAGIC, q.codec_id, layer, k.shape[0])), dtype=torch.uint8)
    return torch.cat([header.to(payload.device), payload])


def _header(buf: torch.Tensor, nbytes: int) -> tuple[int, int, int, int]:
    if buf.dtype != torch.uint8 or buf.dim() != 1:
        raise CodecError(f"receive buffer must be 1-D uint8, got {tuple(buf.shape)} {buf.dtype}")
    if not LAYER_HEADER_BYTES <= nbytes <= buf.numel():
        raise CodecError(f"received {nbytes} bytes: need >= {LAYER_HEADER_BYTES} and <= buffer size {buf.numel()}")
    fields = _HEADER.unpack(buf[:LAYER_HEADER_BYTES].cpu().numpy().tobytes())  # the one sync: shapes
    if fields[0] != LAYER_MAGIC:
        raise CodecError(f"bad magic {fields[0]:#010x}, expected {LAYER_MAGIC:#010x}: not a kvrelay layer message")
    return fields


def read_layer_tokens(buf: torch.Tensor, nbytes: int) -> int:
    return _header(buf, nbytes)[3]


def decode_layer(q: Quantizer, buf: torch.Tensor, nbytes: int, layer: int, num_heads: int, head_dim: int,
                 dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    _, codec, got_layer, n = _header(buf, nbytes)
    if codec != q.codec_id:
        raise CodecError(f"codec id {codec:#x} (kind {codec & 0xFF}, param {codec >> 8}) != this peer's "
                         f"{q.codec_id:#x} ({q.name}, param {q.param})")
    if got_layer != layer:
        raise CodecError(f"message is for layer {got_layer}, expected layer {layer}")
    want = layer_message_bytes(q, n, num_heads, head_dim)
    if want != nbytes:
        raise CodecError(f"{n} tokens of {q.name} (H={num_heads}, D={head_dim}) make {want} bytes, received {nbytes}")
    return q.decode(buf[LAYER_HEADER_BYTES:nbytes], n, num_heads, head_dim, dtype, device)
