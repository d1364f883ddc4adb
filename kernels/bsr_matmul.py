"""y = x · Wᵀ (+ bias) with W in B x B block-sparse rows (docs/format.md, sparserun/formats/bsr.py).

Work is cut into *segments* of at most SEG kept blocks of one block-row, so every program streams about
the same number of bytes however unevenly the blocks fall across rows:

    program (block-row r, segment s, m-tile):
        acc = 0                                             [BLOCK_M, B] fp32
        for the U-block chunks of blocks crow[r] + s*SEG ... (capped at crow[r+1]):
            x_tile = x[m-tile, columns of those U blocks]  (gathered by col_indices)
            w_tile = values[those U blocks]                [B, U*B]
            acc   += x_tile · w_tileᵀ
        one segment per row:  y[m-tile, r*B:(r+1)*B] = acc (+ bias)      (prefill; empty rows write bias)
        several:              partials[r, s] = acc; a reduce kernel sums the S segments (+ bias)

SEG is chosen per call from the layer's largest block-row count (a Python int the layer knows, so no
device sync): large enough to amortise the loop, small enough that decode launches >= 2 waves of programs.
Programs past a short row's end write zeros and exit; the hardware scheduler backfills them.
U > 1 for small blocks (16, 32) so each step's dot has at least 64 reduction columns.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (as_2d, cdiv, check_out, dot_precision, interpreting, m_bucket, next_pow2, num_sms, on_device,
                      workspace)
from ._tuning import pick, rel_err, sample_rows

DECODE_MAX_M = 64

# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------


def _segments(rows: int, max_row: int, m_tiles: int, sms: int, unroll: int, decode: bool) -> int:
    """SEG (blocks per program): split rows only as far as needed for >= 4 waves at decode."""
    if max_row <= 0:
        return unroll
    if not decode:
        return max(unroll, cdiv(max_row, unroll) * unroll)
    seg = cdiv(max_row, unroll) * unroll
    while seg > unroll and rows * m_tiles * cdiv(max_row, seg) < 4 * sms:
        seg = max(unroll, cdiv(seg // 2, unroll) * unroll)
    return seg


FMA_MAX_M = 4  # up to here CUDA-core FMAs are candidates; tensor cores would pad M to 16


def candidate_configs(m: int, b: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    """Tuned choices; SEG (blocks per program) is derived at launch from the layer's row counts."""
    # fp32 dots at B = 128 ("ieee": exact fp32) hold twice the registers of 16-bit ones: 64-row tiles spilled
    # ~15 KB per thread with 4 warps (sm_90, Triton 3.9) and ~1.9 KB with 8 (3.6); 32 rows x 8 warps fit
    wide_fp32 = dtype == torch.float32 and b == 128
    out = []
    if m <= FMA_MAX_M:
        bm = next_pow2(m)
        for u in sorted({max(1, 64 // b), max(1, 128 // b)}):
            warps = 8 if b * b * u >= 8192 else 4
            # the 3-D accumulator lives in registers: past 128 fp32 per thread it spills (B = 128 at M = 4 needs
            # 256 and spilled 504 bytes per thread in the sm_90 SASS: python -m sparserun.bench.offline)
            if bm * b * b * u <= 128 * 32 * warps:
                out.append(dict(BLOCK_M=bm, UNROLL=u, USE_DOT=False, num_warps=warps, num_stages=3))
                # whole block-rows per program: one launch (no segment reduce) at the price of fewer programs;
                # at low density on 8B shapes the two launches were most of an ~11 µs layer (NOTES.md)
                out.append(dict(out[-1], WHOLE_ROWS=True))
    if m <= DECODE_MAX_M:
        bm = min(32, max(16, next_pow2(m))) if wide_fp32 else max(16, next_pow2(m))
        for u in sorted({max(1, 64 // b), max(1, 128 // b)}):
            for warps in (8,) if wide_fp32 else (4, 8) if b >= 64 else (4,):
                out.append(dict(BLOCK_M=bm, UNROLL=u, USE_DOT=True, num_warps=warps, num_stages=3))
    else:
        for bm, warps in ((32, 8),) if wide_fp32 else ((64, 4), (128, 8)):
            out.append(dict(BLOCK_M=bm, UNROLL=max(1, 64 // b), USE_DOT=True, num_warps=warps, num_stages=3))
    return out


def default_config(m: int, b: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    return candidate_configs(m, b, dtype)[0]


def interpreter_config(m: int, b: int) -> dict:
    """Small tiles, FMA for a few rows and dot above, and at most 2 blocks per program, so the CPU tests
    exercise the split path and the reduce kernel."""
    fma = m <= FMA_MAX_M
    return dict(BLOCK_M=next_pow2(m) if fma else (16 if m <= 16 else 32),
                UNROLL=2 if b <= 32 else 1, USE_DOT=not fma, SEG=2 if b <= 32 else 1)


# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _bsr_matmul_kernel(
    # pointers
    x_ptr, crow_ptr, col_ptr, vals_ptr, bias_ptr, out_ptr, part_ptr,
    # sizes
    M, N, S, SEG,
    # strides
    stride_xm, stride_xk, stride_om, stride_on,
    # meta-parameters
    B: tl.constexpr, UNROLL: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_BIAS: tl.constexpr, DIRECT: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_DOT: tl.constexpr,
):
    """x [M, K]; crow [N/B+1], col [nnz] int32; values [nnz, B, B]; out [M, N]; part [N/B, S, M, B] fp32.
    grid = (N/B * S, cdiv(M, BLOCK_M))."""
    # ------------------------------------------------------------------------------------------------
    # which block-row, segment and m-tile
    pid = tl.program_id(0)
    pid_m = tl.program_id(1)
    row = pid // S
    seg = pid % S
    row_begin = tl.load(crow_ptr + row)
    row_end = tl.load(crow_ptr + row + 1)
    begin = row_begin + seg * SEG
    end = tl.minimum(begin + SEG, row_end)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    # this tile's first row of x as a pointer (int64: M * K can pass 2**31 in a long prefill); rows within the
    # tile stay int32 offsets from it, so the loop's address arithmetic is what it was
    x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    rows = tl.arange(0, BLOCK_M)
    offs_b = tl.arange(0, B)  # rows (out) / columns (in) inside a block
    offs_u = tl.arange(0, UNROLL * B)  # UNROLL blocks side by side along the reduction
    u_of = offs_u // B  # which of the UNROLL blocks a reduction column belongs to
    c_in = offs_u % B

    # ------------------------------------------------------------------------------------------------
    # stream this segment's blocks, UNROLL at a time
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, B), dtype=tl.float32)
    elif BLOCK_M == 1:
        acc2 = tl.zeros((B, UNROLL * B), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, B, UNROLL * B), dtype=tl.float32)
    for i in range(begin, end, UNROLL):
        blk = i + u_of  # [UNROLL*B] block index of each reduction column
        valid = blk < end
        # w[r, u*B + c] = values[i + u, r, c]: the U blocks laid side by side, rows = output features
        w = tl.load(vals_ptr + blk.to(tl.int64)[None, :] * (B * B) + offs_b[:, None] * B + c_in[None, :],
                    mask=valid[None, :], other=0.0)
        if BLOCK_M == 1 and not USE_DOT:
            # one token: a 2-D accumulator in w's own layout, x read as a [1, U*B] row so that it shares it (a
            # 1-D x, or the 3-D broadcast below, costs a shared-memory shuffle per step in the sm_90 SASS)
            bcol2 = tl.load(col_ptr + blk[None, :], mask=valid[None, :], other=0)
            x2 = tl.load(x_ptr + (bcol2 * B + c_in[None, :]) * stride_xk + offs_m[:, None] * stride_xm,
                         mask=mask_m[:, None] & valid[None, :], other=0.0)
            acc2 += w.to(tl.float32) * x2.to(tl.float32)
        else:
            bcol = tl.load(col_ptr + blk, mask=valid, other=0)
            x = tl.load(x_tile + rows[:, None] * stride_xm + (bcol * B + c_in)[None, :] * stride_xk,
                        mask=mask_m[:, None] & valid[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
            else:
                # a handful of tokens: CUDA-core FMAs beat padding M to the 16 rows a tensor-core op needs
                acc3 += x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :]
    if USE_DOT:
        pass
    elif BLOCK_M == 1:
        acc = tl.sum(acc2, axis=1)[None, :]
    else:
        acc = tl.sum(acc3, axis=2)

    # ------------------------------------------------------------------------------------------------
    # epilogue
    offs_n = row * B + offs_b
    if DIRECT:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])
    else:
        base = part_ptr + (row * S + seg).to(tl.int64) * M * B
        tl.store(base + offs_m[:, None] * B + offs_b[None, :], acc, mask=mask_m[:, None])


@triton.jit
def _segment_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, S, stride_om, stride_on,
                           B: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, r*B + j] = sum_s part[r, s, m, j] (+ bias); one program per BLOCK outputs."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    m = offs // N
    n = offs % N
    row = n // B
    j = n % B
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + ((row * S + s).to(tl.int64) * M + m) * B + j, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def bsr_matmul(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
               max_row_blocks: int, bias: torch.Tensor | None = None, config: dict | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for W [N, K] in BSR: crow [N/B+1] int32, col [nnz] int32, values [nnz, B, B].

    max_row_blocks: the most blocks any block-row keeps (the layer knows it; passing it keeps the launch
    free of device syncs, so it can be captured in a CUDA graph). x: [..., K]; returns [..., N].
    """
    b = values.shape[-1]
    rows = crow.numel() - 1
    n = rows * b
    if values.dim() != 3 or values.shape[1] != b or b not in (16, 32, 64, 128):
        raise ValueError(f"bsr_matmul: values must be [nnz, B, B] with B in 16, 32, 64, 128, got "
                         f"{tuple(values.shape)}")
    if crow.dtype != torch.int32 or col.dtype != torch.int32:
        raise TypeError(f"bsr_matmul: indices must be int32, got {crow.dtype}, {col.dtype}")
    if values.dtype != x.dtype:
        raise TypeError(f"bsr_matmul: x dtype {x.dtype} != weight dtype {values.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bsr_matmul: bias shape {tuple(bias.shape)} != ({n},)")
    k = x.shape[-1]
    if k % b:
        raise ValueError(f"bsr_matmul: in_features {k} is not a multiple of the block size {b}")
    device = on_device("bsr_matmul", x, crow=crow, col=col, values=values, bias=bias, out=out)
    x2 = as_2d(x, k, "bsr_matmul")
    m = x2.shape[0]
    out = check_out(out, m, n, x)
    if m == 0 or n == 0:
        return out.reshape(*x.shape[:-1], n)
    crow, col, values = crow.contiguous(), col.contiguous(), values.contiguous()
    has_bias = bias is not None
    bias_arg = bias if has_bias else values

    def launch(cfg: dict) -> torch.Tensor:
        cfg = dict(cfg)
        launch_kw = {kk: cfg.pop(kk) for kk in ("num_warps", "num_stages") if kk in cfg}
        # SEG is a runtime argument derived from this layer's rows: a new mask must not mean a new compile
        whole = cfg.pop("WHOLE_ROWS", False)
        seg = cfg.pop("SEG", None) or _segments(rows, max_row_blocks, cdiv(m, cfg["BLOCK_M"]),
                                                num_sms(x), cfg["UNROLL"], m <= DECODE_MAX_M and not whole)
        s = max(1, cdiv(max_row_blocks, seg))
        direct = s == 1
        part = out if direct else workspace((rows, s, m, b), x.device)
        grid = (rows * s, cdiv(m, cfg["BLOCK_M"]))
        _bsr_matmul_kernel[grid](
            x2, crow, col, values, bias_arg, out, part, m, n, s, seg,
            x2.stride(0), x2.stride(1), out.stride(0), out.stride(1),
            B=b, HAS_BIAS=has_bias, DIRECT=direct, DOT_PRECISION=dot_precision(x.dtype), **cfg, **launch_kw)
        if not direct:
            block = 1024
            _segment_reduce_kernel[(cdiv(m * n, block),)](
                part, bias_arg, out, m, n, s, out.stride(0), out.stride(1), B=b, HAS_BIAS=has_bias,
                BLOCK=block)
        return out

    def check(y: torch.Tensor) -> float:
        """Relative error of sampled rows of x and block-rows of W against torch (tuning only: syncs)."""
        rm = sample_rows(m)
        count = min(rows, max(1, 64 // b))  # the first and last few block-rows: about 64 output features each
        errs = []
        for r0 in sorted({0, rows - count}):
            lo, hi = int(crow[r0]), int(crow[r0 + count])
            sub = bsr_dense_ref(crow[r0:r0 + count + 1] - lo, col[lo:hi], values[lo:hi], k)
            ref = x2[rm].float() @ sub.float().T
            cols = slice(r0 * b, (r0 + count) * b)
            if has_bias:
                ref += bias[cols].float()
            errs.append(rel_err(y[rm][:, cols], ref))
        return max(errs)

    with device:
        if config is None:
            if interpreting():
                config = interpreter_config(m, b)
            else:
                mb = m_bucket(m)
                # density to one decimal: layers of one model share tuning across their (different) masks
                dens = round(col.numel() / max(1, rows * (k // b)), 1)
                key = ("bsr", n, k, b, dens, mb, x.dtype, has_bias, str(x.device))
                config = pick(key, lambda: candidate_configs(mb, b, x.dtype), launch,
                              lambda: default_config(mb, b, x.dtype), check)
        launch(config)
    return out.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def bsr_dense_ref(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """Dense [N, k] weight from BSR tensors, through torch's own sparse BSR type."""
    b = values.shape[-1]
    n = (crow.numel() - 1) * b
    return torch.sparse_bsr_tensor(crow.long(), col.long(), values, size=(n, k),
                                   check_invariants=True).to_dense()


def bsr_matmul_ref(x: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor,
                   bias: torch.Tensor | None = None, upcast: bool = True) -> torch.Tensor:
    """Pure-torch y = x · Wᵀ (+ bias); float64 when `upcast` (the test oracle), else in x's dtype."""
    dt = torch.float64 if upcast else x.dtype
    w = bsr_dense_ref(crow, col, values.to(dt), x.shape[-1])
    y = x.to(dt) @ w.T
    if bias is not None:
        y = y + bias.to(dt)
    return y
