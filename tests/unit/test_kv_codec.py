"""Unit tests for cluster/kv_codec.py: KV payload quantizers and the layer message framing.

Error bounds are checked per element against the scales read back from the payload
(whose offsets the layout table fixes), so a looser quantizer or a moved field fails.
"""

from __future__ import annotations

import struct

import pytest
import torch

from cluster.kv_codec import (
    LAYER_HEADER_BYTES,
    LAYER_MAGIC,
    CodecError,
    decode_layer,
    encode_layer,
    get_quantizer,
    layer_message_bytes,
    ratio_vs_16bit,
    read_layer_tokens,
)

H, D = 3, 64


def _eps(x: torch.Tensor) -> torch.Tensor:
    return 1e-6 * x.abs() + 1e-7  # float32 arithmetic slack, nothing more


def make_kv(n: int, h: int = H, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random KV with the awkward cases: outlier channels and tokens, an all-zero head,
    +/- extremes, tiny magnitudes and constant runs."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, h, d, generator=g)
    v = torch.randn(n, h, d, generator=g)
    k[:, :, 5] *= 40.0  # outlier key channel (what KIVI's per-channel keys are for)
    k[n // 2] *= 100.0  # outlier token
    v[:, :, 7] *= 25.0
    k[:, 1] = 0.0  # all-zero head
    v[:, 1] = 0.0
    k[0, 0, 0], k[-1, 0, 1] = 3000.0, -3000.0
    v[0, 2, 0], v[-1, 2, 3] = -2000.0, 2000.0
    v[min(1, n - 1), 2] = 1e-9 * torch.randn(d, generator=g)  # tiny magnitudes
    k[:, 2, 9] = -1.5  # a constant channel: max == min in every key group
    return k, v


def _read(payload: torch.Tensor, off: int, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    nb = count * dtype.itemsize
    return payload[off : off + nb].clone().view(dtype).float(), off + nb


# ----- round trips with exact per-element bounds -----


@pytest.mark.parametrize("n", [1, 37, 256])
def test_int8_round_trip_within_half_a_step(n):
    q = get_quantizer("int8")
    k, v = make_kv(n)
    payload = q.encode(k, v)
    sk, off = _read(payload, 2 * n * H * D, n * H, torch.float16)
    sv, off = _read(payload, off, n * H, torch.float16)
    assert off == payload.numel()
    dk, dv = q.decode(payload, n, H, D, torch.float32, "cpu")
    for x, s, dx in ((k, sk.view(n, H, 1), dk), (v, sv.view(n, H, 1), dv)):
        assert (s > 0).all()
        assert (x.abs().amax(-1, keepdim=True) / s <= 127).all()  # rounded up: codes never clip
        assert ((x - dx).abs() - (s / 2 + _eps(x))).max() <= 0


@pytest.mark.parametrize("n", [1, 37, 256])
def test_fp8_round_trip_within_three_mantissa_bits(n):
    q = get_quantizer("fp8")
    k, v = make_kv(n)
    payload = q.encode(k, v)
    sk, off = _read(payload, 2 * n * H * D, H, torch.float32)
    sv, off = _read(payload, off, H, torch.float32)
    assert off == payload.numel()
    dk, dv = q.decode(payload, n, H, D, torch.float32, "cpu")
    for x, s, dx in ((k, sk, dk), (v, sv, dv)):
        amax = x.abs().amax(dim=(0, 2))
        torch.testing.assert_close(s[amax > 0], amax[amax > 0] / 448)
        assert (s > 0).all()
        s = s.view(1, H, 1)
        bound = x.abs() * 2**-4 + s * 2**-10 + _eps(x)
        assert ((x - dx).abs() - bound).max() <= 0
        assert torch.isfinite(dx).all()


@pytest.mark.parametrize(("n", "group"), [(37, 16), (37, 32), (64, 32), (5, 8), (1, 64), (256, 64)])
def test_int4_round_trip_within_half_a_step(n, group):
    q = get_quantizer("int4", group_size=group)
    k, v = make_kv(n)
    payload = q.encode(k, v)
    groups = -(-n // group)
    off = n * H * D  # K and V codes, half a byte each
    mk, off = _read(payload, off, groups * H * D, torch.float16)
    sk, off = _read(payload, off, groups * H * D, torch.float16)
    mv, off = _read(payload, off, n * H * D // group, torch.float16)
    sv, off = _read(payload, off, n * H * D // group, torch.float16)
    assert off == payload.numel() == q.nbytes(n, H, D)
    dk, dv = q.decode(payload, n, H, D, torch.float32, "cpu")

    # Keys: per (token group, head, channel); the last group may be partial.
    tok_group = torch.arange(n) // group
    mk, sk = mk.view(groups, H, D)[tok_group], sk.view(groups, H, D)[tok_group]  # [n, H, D]
    kmin = torch.stack([k[tok_group == i].amin(0) for i in range(groups)])[tok_group]
    kmax = torch.stack([k[tok_group == i].amax(0) for i in range(groups)])[tok_group]
    assert (mk <= kmin).all() and (mk + 15 * sk >= kmax).all()  # codes cover every group
    assert ((k - dk).abs() - (sk / 2 + _eps(k))).max() <= 0

    # Values: per (token, head, channel group).
    vg = v.view(n, H, D // group, group)
    mv, sv = mv.view(n, H, D // group, 1), sv.view(n, H, D // group, 1)
    assert (mv <= vg.amin(-1, keepdim=True)).all() and (mv + 15 * sv >= vg.amax(-1, keepdim=True)).all()
    err = (vg - dv.view(n, H, D // group, group)).abs() - (sv / 2 + _eps(vg))
    assert err.max() <= 0
    assert (dk[:, 1] == 0).all() and (dv[:, 1] == 0).all()  # all-zero heads come back exact


@pytest.mark.parametrize("raw", [torch.float32, torch.bfloat16, torch.float16])
def test_none_is_lossless_in_its_raw_dtype(raw):
    q = get_quantizer("none", raw_dtype=raw)
    k, v = (x.to(raw) for x in make_kv(37))
    dk, dv = q.decode(q.encode(k, v), 37, H, D, raw, "cpu")
    assert dk.dtype == raw and torch.equal(dk, k) and torch.equal(dv, v)


def test_none_casts_to_the_cache_dtype():
    q = get_quantizer("none", raw_dtype=torch.bfloat16)
    k, v = make_kv(8)
    dk, dv = q.decode(q.encode(k, v), 8, H, D, torch.float32, "cpu")
    assert torch.equal(dk, k.bfloat16().float()) and torch.equal(dv, v.bfloat16().float())


@pytest.mark.parametrize("name", ["none", "int8", "fp8", "int4"])
def test_bf16_input_and_bf16_decode(name):
    q = get_quantizer(name, raw_dtype=torch.bfloat16)
    k, v = (x.bfloat16() for x in make_kv(40))
    payload = q.encode(k, v)
    ref = q.decode(payload, 40, H, D, torch.float32, "cpu")
    dk, dv = q.decode(payload, 40, H, D, torch.bfloat16, "cpu")
    assert dk.dtype == dv.dtype == torch.bfloat16 and dk.shape == (40, H, D)
    assert torch.equal(dk, ref[0].bfloat16()) and torch.equal(dv, ref[1].bfloat16())


@pytest.mark.parametrize("name", ["none", "int8", "fp8", "int4"])
def test_zero_tokens(name):
    q = get_quantizer(name)
    empty = torch.zeros(0, H, D)
    payload = q.encode(empty, empty)
    assert payload.numel() == q.nbytes(0, H, D)
    dk, dv = q.decode(payload, 0, H, D, torch.float32, "cpu")
    assert dk.shape == dv.shape == (0, H, D)


# ----- packed sizes: literal integers from the layout table -----

# (n=37, H=3, D=64): n*H*D = 7104, n*H = 111.
EXPECTED_NBYTES = {
    ("none", torch.float32, 32): 56832,  # 2*7104*4
    ("none", torch.bfloat16, 32): 28416,  # 2*7104*2
    ("int8", torch.float32, 32): 14652,  # 2*7104 + 4*111
    ("fp8", torch.float32, 32): 14232,  # 2*7104 + 8*3
    ("int4", torch.float32, 16): 11184,  # 7104 + 4*3*(3*64 + 37*64/16)
    ("int4", torch.float32, 32): 9528,  # 7104 + 4*3*(2*64 + 37*64/32)
    ("int4", torch.float32, 64): 8316,  # 7104 + 4*3*(1*64 + 37*64/64)
}


@pytest.mark.parametrize(("name", "raw", "group"), list(EXPECTED_NBYTES))
def test_packed_sizes_are_exact(name, raw, group):
    q = get_quantizer(name, raw_dtype=raw, group_size=group)
    k, v = make_kv(37)
    payload = q.encode(k, v)
    assert payload.dtype == torch.uint8 and payload.dim() == 1
    assert payload.numel() == q.nbytes(37, H, D) == EXPECTED_NBYTES[(name, raw, group)]
    assert layer_message_bytes(q, 37, H, D) == 16 + EXPECTED_NBYTES[(name, raw, group)]


def test_ratios_vs_16bit():
    n = 1024
    assert ratio_vs_16bit(get_quantizer("none", raw_dtype=torch.bfloat16), n, H, D) == 1.0
    assert ratio_vs_16bit(get_quantizer("int8"), n, H, D) == 786432 / 405504
    assert ratio_vs_16bit(get_quantizer("fp8"), n, H, D) == 786432 / 393240
    assert ratio_vs_16bit(get_quantizer("int4", group_size=32), n, H, D) == 3.2
    assert ratio_vs_16bit(get_quantizer("int4", group_size=64), n, H, D) == 786432 / 221184


# ----- int4 packing -----


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    q = get_quantizer("int4", group_size=2)
    k = torch.full((1, 1, 4), 0.5)  # one token: min == max, every key code 0
    v = torch.tensor([[[0.0, 15.0, 15.0, 0.0]]])  # groups [0, 15] and [15, 0]: min 0, scale 1
    payload = q.encode(k, v)
    assert payload[:4].tolist() == [0x00, 0x00, 0xF0, 0x0F]  # K codes, then V codes
    dk, dv = q.decode(payload, 1, 1, 4, torch.float32, "cpu")
    assert torch.equal(dk, k) and torch.equal(dv, v)


def test_int4_is_about_half_of_int8():
    n = 4096
    int8, int4 = get_quantizer("int8").nbytes(n, H, D), get_quantizer("int4", group_size=64).nbytes(n, H, D)
    assert int4 < 0.56 * int8
    payload = get_quantizer("int4", group_size=64).encode(*make_kv(n))
    assert payload.numel() == int4


# ----- layer framing -----


def _frame(q, layer=3, n=37):
    k, v = make_kv(n)
    msg = encode_layer(q, layer, k, v)
    buf = torch.zeros(msg.numel() + 1000, dtype=torch.uint8)  # receive buffer: larger
    buf[: msg.numel()] = msg
    return msg, buf


@pytest.mark.parametrize("name", ["none", "int8", "fp8", "int4"])
def test_layer_round_trip_through_a_larger_buffer(name):
    q = get_quantizer(name)
    msg, buf = _frame(q)
    assert msg.numel() == layer_message_bytes(q, 37, H, D)
    header = struct.unpack("<IIII", msg[:16].numpy().tobytes())
    assert header == (LAYER_MAGIC, q.codec_id, 3, 37)
    assert read_layer_tokens(buf, msg.numel()) == 37
    dk, dv = decode_layer(q, buf, msg.numel(), 3, H, D, torch.float32, "cpu")
    rk, rv = q.decode(msg[LAYER_HEADER_BYTES:], 37, H, D, torch.float32, "cpu")
    assert torch.equal(dk, rk) and torch.equal(dv, rv)


@pytest.mark.parametrize("name", ["int8", "fp8", "int4"])
def test_layer_decodes_from_a_misaligned_buffer(name):
    q = get_quantizer(name)
    msg, _ = _frame(q, n=7)
    big = torch.zeros(msg.numel() + 9, dtype=torch.uint8)
    big[1 : 1 + msg.numel()] = msg
    dk, dv = decode_layer(q, big[1:], msg.numel(), 3, H, D, torch.float32, "cpu")
    rk, rv = q.decode(msg[LAYER_HEADER_BYTES:], 7, H, D, torch.float32, "cpu")
    assert torch.equal(dk, rk) and torch.equal(dv, rv)


def test_framing_rejects_bad_messages():
    q = get_quantizer("int8")
    msg, buf = _frame(q)
    nb = msg.numel()
    args = (3, H, D, torch.float32, "cpu")

    bad = buf.clone()
    bad[0] ^= 0xFF
    with pytest.raises(CodecError, match="magic"):
        decode_layer(q, bad, nb, *args)
    with pytest.raises(CodecError, match="magic"):
        read_layer_tokens(bad, nb)
    with pytest.raises(CodecError, match="codec id"):
        decode_layer(get_quantizer("fp8"), buf, nb, *args)
    with pytest.raises(CodecError, match="layer 3, expected layer 4"):
        decode_layer(q, buf, nb, 4, H, D, torch.float32, "cpu")
    for wrong in (nb - 1, nb + 1, nb + 444):
        with pytest.raises(CodecError, match="37 tokens"):
            decode_layer(q, buf, wrong, *args)
    with pytest.raises(CodecError, match="buffer size"):
        decode_layer(q, msg[:-5], nb, *args)  # truncated receive
    with pytest.raises(CodecError, match="buffer size"):
        read_layer_tokens(msg[:-5], nb)
    with pytest.raises(CodecError, match=">= 16"):
        read_layer_tokens(buf, 10)
    with pytest.raises(CodecError, match="uint8"):
        read_layer_tokens(buf.view(torch.int8), nb)
    with pytest.raises(CodecError, match=">= "):
        q.decode(msg[LAYER_HEADER_BYTES:-1], 37, H, D, torch.float32, "cpu")


def test_codec_id_carries_the_parameters():
    i32, i16 = get_quantizer("int4", group_size=32), get_quantizer("int4", group_size=16)
    msg, buf = _frame(i32, n=8)  # sizes differ anyway; the id check comes first
    with pytest.raises(CodecError, match="codec id"):
        decode_layer(i16, buf, msg.numel(), 3, H, D, torch.float32, "cpu")
    ids = {get_quantizer(n).codec_id for n in ("none", "int8", "fp8", "int4")}
    assert len(ids) == 4
    assert get_quantizer("none", raw_dtype=torch.bfloat16).codec_id != get_quantizer("none").codec_id


# ----- configuration errors -----


def test_unknown_quantizer_lists_the_valid_ones():
    with pytest.raises(ValueError, match="none, int8, fp8, int4"):
        get_quantizer("bogus")


@pytest.mark.parametrize("group", [0, -2, 3, 2.0])
def test_bad_group_size(group):
    with pytest.raises(ValueError, match="group_size"):
        get_quantizer("int4", group_size=group)


def test_int4_needs_head_dim_divisible_by_group():
    q = get_quantizer("int4", group_size=32)
    k, v = make_kv(4, d=48)
    with pytest.raises(ValueError, match="head_dim 48.*group_size 32"):
        q.encode(k, v)
    with pytest.raises(ValueError, match="head_dim 48"):
        q.nbytes(4, H, 48)


def test_encode_layer_rejects_mismatched_shapes():
    k, v = make_kv(4)
    with pytest.raises(ValueError, match=r"\[n, H, D\]"):
        encode_layer(get_quantizer("int8"), 0, k, v[:3])
