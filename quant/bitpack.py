"""Dense bit packing of integer codes, and the sf8 scale format: the exact, model-free
bottom layer of quant/packing.py.

sf8 stores a positive scale in one byte (4-bit exponent, 4-bit mantissa with an
implicit leading 1) relative to one int8 exponent base per row: 5 significant bits
and a 2^16 span below each row's largest scale. The measured cost of snapping RTN
scales onto it is in /work/notes/packing.md; e3m5 was tried and rejected (rows
whose scales span more than 2^8 lose their small groups).
"""
from __future__ import annotations

import torch

_SF8_MANT = 4  # stored mantissa bits of an sf8 scale; the exponent gets the other 4
_SF8_TOP = 2 ** (8 - _SF8_MANT) - 1  # largest exponent code
MAX_CODE_BITS = 32  # weight codes use 1..8; zero points may need more


# -- dense bit packing ---------------------------------------------------------------------
def check_bits(bits: int) -> None:
    if not (isinstance(bits, int) and 1 <= bits <= MAX_CODE_BITS):
        raise ValueError(f"code width must be an integer in 1..{MAX_CODE_BITS} bits, got {bits!r}")


def packed_row_bytes(cols: int, bits: int) -> int:
    return (cols * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integers in [0, 2^bits) -> (rows, ceil(cols*bits/8)) uint8.

    Code j of a row occupies bits [j*bits, (j+1)*bits) of the row's bit string (bit i of
    byte k is bit 8k+i), so any width is dense; the tail of the last byte is zero.
    """
    check_bits(bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes must be a 2-d integer tensor, got {codes.dim()}-d {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits}) for {bits}-bit packing")
    rows, cols = codes.shape
    nbytes = packed_row_bytes(cols, bits)
    if bits == 8:
        return codes.to(torch.uint8)
    if bits < 8:  # 8 codes = ``bits`` bytes = one int64 word (<= 56 bits used): a few vector ops
        words = torch.nn.functional.pad(codes.to(torch.int64), (0, -cols % 8)).reshape(rows, -1, 8)
        words = (words << (torch.arange(8, device=codes.device) * bits)).sum(-1, keepdim=True)
        out = (words >> (torch.arange(bits, device=codes.device) * 8)) & 0xFF
        return out.reshape(rows, -1)[:, :nbytes].to(torch.uint8)
    word = torch.int64
    shifts = torch.arange(bits, dtype=word, device=codes.device)
    stream = ((codes.to(word).unsqueeze(-1) >> shifts) & 1).to(torch.uint8)
    stream = torch.nn.functional.pad(stream.reshape(rows, cols * bits), (0, nbytes * 8 - cols * bits))
    stream = stream.reshape(rows, nbytes, 8)
    out = torch.zeros(rows, nbytes, dtype=torch.uint8, device=codes.device)
    for i in range(8):  # eight bit positions, not a loop over elements
        out |= stream[..., i] << i
    return out


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int64 codes (rows, cols); checks shape and padding."""
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed codes must be 2-d uint8, got {packed.dim()}-d {packed.dtype}")
    if packed.shape[1] != packed_row_bytes(cols, bits):
        raise ValueError(f"packed codes have {packed.shape[1]} bytes per row, {cols} {bits}-bit codes "
                         f"need {packed_row_bytes(cols, bits)}")
    rows = packed.shape[0]
    if bits == 8:
        return packed.to(torch.int64)
    if bits < 8:  # the inverse of pack_codes' word path
        groups = -(-cols // 8)
        data = torch.nn.functional.pad(packed.to(torch.int64), (0, groups * bits - packed.shape[1]))
        words = (data.reshape(rows, groups, bits) << (torch.arange(bits, device=packed.device) * 8)).sum(
            -1, keepdim=True)
        codes = ((words >> (torch.arange(8, device=packed.device) * bits)) & (2**bits - 1)).reshape(rows, -1)
        if codes[:, cols:].any():
            raise ValueError("packed codes have non-zero padding bits (corrupt data)")
        return codes[:, :cols].contiguous()
    stream = ((packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1)
    stream = stream.reshape(rows, -1)
    if stream[:, cols * bits:].any():
        raise ValueError("packed codes have non-zero padding bits (corrupt data)")
    planes = stream[:, :cols * bits].reshape(rows, cols, bits)
    codes = torch.zeros(rows, cols, dtype=torch.int64, device=packed.device)
    for i in range(bits):  # one pass per bit position
        codes |= planes[..., i].to(torch.int64) << i
    return codes


# -- scales --------------------------------------------------------------------------------
def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2^e as fp32, exact by construction (its bit pattern); e must be in [-126, 127]."""
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _sf8_parts(x: torch.Tensor):
    """x = m * 2^(E-4) with integer E = floor(log2 x); m in [16, 32), exact for normal x."""
    E = torch.frexp(x)[1].to(torch.int32) - 1
    return x * _pow2((_SF8_MANT - E).clamp(-126, 127)), E


def sf8_decode(codes: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """value = (16 + mantissa) * 2^(exponent + base[row]), evaluated exactly in fp32."""
    c = codes.to(torch.int64)
    mant = (c & (2**_SF8_MANT - 1)) + 2**_SF8_MANT
    return mant.float() * _pow2((c >> _SF8_MANT) + base.to(torch.int32).unsqueeze(-1))


def snap_scales_sf8(scale: torch.Tensor) -> torch.Tensor:
    """Round (rows, groups) scales UP onto the sf8 grid (so the grid still spans each range).

    Each row gets one exponent base (its largest scale sits in the top exponent); each
    scale keeps 5 significant bits (<= 6.25% larger) and 16 exponents below the row's
    largest; smaller ones are raised to the row's smallest sf8 value.
    """
    x = scale.float()
    if scale.dim() != 2 or not bool(((x > 1e-30) & (x < 1e30)).all()):
        raise ValueError("sf8 scales must be a 2-d tensor of finite values in (1e-30, 1e30)")
    m, E = _sf8_parts(x)
    m = torch.ceil(m)
    bump = m == 2 ** (_SF8_MANT + 1)
    m, E = torch.where(bump, m / 2, m), E + bump.to(torch.int32)
    base = E.amax(-1) - _SF8_MANT - _SF8_TOP
    e = E - _SF8_MANT - base.unsqueeze(-1)
    m = torch.where(e < 0, torch.full_like(m, 2**_SF8_MANT), m)
    codes = e.clamp(min=0) * 2**_SF8_MANT + (m.to(torch.int32) - 2**_SF8_MANT)
    return sf8_decode(codes, base)


def sf8_encode(scale: torch.Tensor):
    """(codes uint8, base int8) that decode to ``scale`` bitwise, or None if it is off-grid."""
    x = scale.float()
    if scale.dim() != 2 or scale.shape[-1] == 0 or not bool(((x > 1e-30) & (x < 1e30)).all()):
        return None
    m, E = _sf8_parts(x)
    base = E.amax(-1) - _SF8_MANT - _SF8_TOP
    e = E - _SF8_MANT - base.unsqueeze(-1)
    if not torch.equal(m, m.floor()) or int(e.min()) < 0 or not bool(((base >= -128) & (base <= 127)).all()):
        return None
    codes = (e * 2**_SF8_MANT + m.to(torch.int32) - 2**_SF8_MANT).to(torch.uint8)
    base = base.to(torch.int8)
    return (codes, base) if bitwise_equal(sf8_decode(codes, base), x) else None


def compact_float(x: torch.Tensor) -> torch.Tensor:
    """fp16 if every value survives the round trip bitwise, else fp32."""
    x = x.float()
    return x.half() if bitwise_equal(x.half().float(), x) else x


def bit_pattern(x: torch.Tensor) -> torch.Tensor:
    """Floats as same-width integers, so -0.0 != 0.0 and equality means identical bits."""
    views = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.contiguous().view(views[x.element_size()]) if x.dtype.is_floating_point else x


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(bit_pattern(a), bit_pattern(b))
