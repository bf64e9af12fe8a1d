"""A fused implicit-GEMM convolution whose K loop steps one crossbar tile at a time.

For each output block (pixels x columns of one conv group) the kernel loops over input cycles,
row tiles and slices; inside, it accumulates one tile's partial sums in registers (im2col rows
gathered on the fly from the NHWC input levels, the cycle's DAC digit extracted in registers),
quantises them with that crossbar column's ADC step, applies column scale and shifts, and adds
them to the output accumulator. No tile, slice or cycle tensor is ever written to memory: the
kernel does the plain GEMM's multiply-adds (times slices and cycles) and writes only the output.
Rounding is half-to-even, as ``torch.round`` in the torch backends.

The loop bounds (row tiles, slices, cycles) are compile-time constants: a network has a handful
of distinct values, so this costs a few specialisations, and Triton 3.6's interpreter cannot
run a ``range`` over a runtime scalar argument.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Compile options of every launch. No FMA contraction: the ADC must round fl(acc * irow), as
#: torch does. Contracted into floor(fma(acc, irow, 0.5)) and fma(-acc, irow, q), the product is
#: never rounded, so exact ties of fl(acc * irow), common with integer partial sums, round up
#: instead of to even (seen on an H200: 49 of 864 outputs of a test layer off by one ADC level;
#: the Triton interpreter does not contract, so it cannot show this).
LAUNCH_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _conv_adc_kernel(
    u_ptr, w_ptr, inv_ptr, mult_ptr, bias_ptr, out_ptr,
    M, H, W, CIN, HO, WO, COUT, COUT_G, CIN_G, ROWS,
    SH, SW, PH, PW, DH, DW, ZP, DAC_BASE, LO, HI,
    RT: tl.constexpr, S: tl.constexpr, C: tl.constexpr,
    KH: tl.constexpr, KW: tl.constexpr, R: tl.constexpr, SPLIT: tl.constexpr,
    QUANT: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < COUT_G
    wo = offs_m % WO
    ho = (offs_m // WO) % HO
    nb = offs_m // (WO * HO)
    col = g * COUT_G + offs_n  # global output column
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    div = 1.0
    for c in range(0, C):
        for t in range(0, RT):
            for s in range(0, S):
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for k0 in range(0, R, BLOCK_K):
                    r = t * R + k0 + tl.arange(0, BLOCK_K)  # layer-matrix rows of this tile
                    r_ok = (r < (t + 1) * R) & (r < ROWS)
                    ci = r // (KH * KW)
                    a = (r // KW) % KH
                    b = r % KW
                    hi_ = ho[:, None] * SH - PH + a[None, :] * DH
                    wi_ = wo[:, None] * SW - PW + b[None, :] * DW
                    inside = (hi_ >= 0) & (hi_ < H) & (wi_ >= 0) & (wi_ < W)
                    ok = m_ok[:, None] & r_ok[None, :]
                    ptr = u_ptr + ((nb[:, None] * H + hi_) * W + wi_) * CIN \
                        + g * CIN_G + ci[None, :]
                    uv = tl.load(ptr, mask=ok & inside, other=0.0)
                    uv = tl.where(ok & (~inside), ZP, uv)  # padding carries the zero point
                    if SPLIT:
                        uv = tl.floor(uv / div)
                        uv = uv - tl.floor(uv / DAC_BASE) * DAC_BASE
                    wp = w_ptr + ((g * S + s) * (RT * R) + r[:, None]) * COUT_G \
                        + offs_n[None, :]
                    wv = tl.load(wp, mask=r_ok[:, None] & n_ok[None, :], other=0.0)
                    if IEEE:
                        acc += tl.dot(uv, wv, input_precision="ieee")
                    else:
                        acc += tl.dot(uv, wv)
                mrow = tl.load(mult_ptr + ((c * RT + t) * S + s) * COUT + col, mask=n_ok,
                               other=0.0)
                if QUANT:
                    irow = tl.load(inv_ptr + t * COUT + col, mask=n_ok, other=0.0)
                    v = acc * irow[None, :]
                    q = tl.floor(v + 0.5)  # round half to even, as torch.round
                    tie = (q - v) == 0.5
                    odd = (q - 2.0 * tl.floor(q * 0.5)) == 1.0
                    q = tl.where(tie & odd, q - 1.0, q)
                    q = tl.minimum(tl.maximum(q, LO), HI)
                    total += q * mrow[None, :]
                else:
                    total += acc * mrow[None, :]
        div = div * DAC_BASE
    bias = tl.load(bias_ptr + col, mask=n_ok, other=0.0)
    total += bias[None, :]
    optr = out_ptr + offs_m[:, None] * COUT + col[None, :]
    tl.store(optr, total, mask=m_ok[:, None] & n_ok[None, :])


def conv_adc(u: torch.Tensor, w: torch.Tensor, *, kh: int, kw: int, stride: tuple[int, int],
             pads: tuple[int, int], dilation: tuple[int, int], groups: int, rows: int, R: int,
             cycles: int, dac_bits: int, zp: float, inv: torch.Tensor, mult: torch.Tensor,
             bias: torch.Tensor, lo: float, hi: float, quantize: bool, ieee: bool
             ) -> torch.Tensor:
    """Faithful layer output (N, Ho, Wo, Cout) from input levels ``u`` (N, H, W, Cin).

    Args:
        u: input levels, NHWC, float32, unpadded (padding positions read the zero point).
        w: slice values (groups, S, row_tiles * R, Cout/groups), rows zero-padded.
        inv: 1/step (row_tiles, Cout); mult: step x shifts x column scale x output scale
            (cycles, row_tiles, S, Cout); bias: (Cout,).
        ieee: exact fp32 products (needed when cell values are not small integers); otherwise
            TF32, exact for integer digits and levels below 2**11.
    """
    n, h, wd, cin = u.shape
    g, S, _, cout_g = w.shape
    rt = inv.shape[0]
    ho = (h + 2 * pads[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (wd + 2 * pads[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    m = n * ho * wo
    cout = g * cout_g
    out = torch.empty(m, cout, device=u.device, dtype=torch.float32)
    block_m, block_k = 64, 16 if R < 32 else 32
    block_n = 16 if cout_g <= 16 else (32 if cout_g <= 32 else 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(cout_g, block_n), g)
    _conv_adc_kernel[grid](
        u.contiguous(), w.contiguous(), inv.contiguous(), mult.contiguous(), bias.contiguous(),
        out, m, h, wd, cin, ho, wo, cout, cout_g, cin // groups, rows,
        stride[0], stride[1], pads[0], pads[1], dilation[0], dilation[1], float(zp),
        float(2 ** dac_bits), float(lo), float(hi),
        RT=rt, S=S, C=cycles, KH=kh, KW=kw, R=R, SPLIT=cycles > 1, QUANT=quantize, IEEE=ieee,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        **LAUNCH_OPTIONS,
    )
    return out.view(n, ho, wo, cout)
