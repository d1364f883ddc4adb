"""y = x · Wᵀ (+ bias) with W in the 2:4 packed layout (docs/format.md, sparserun/formats/semi24.py).

Algorithm, per program (one BLOCK_M x BLOCK_N output tile, one slice of K when split):

    for each BLOCK_K step of K:
        x_tile   = x[m-tile, k-step]                       (dense)
        vals     = values[n-tile, k-step / 2]              (the compressed weight: half the bytes)
        nibbles  = meta[n-tile, k-step / 8]                (4 bits per group of 4)
        w_tile   = expand(vals, nibbles)  -> [BLOCK_N, BLOCK_K] in registers, never written to memory
        acc     += x_tile · w_tileᵀ                        (tensor cores, fp32 accumulator)
    y = acc (+ bias)         or, split over K: partials[split] = acc, then a reduce kernel sums + bias

Decode (M <= 64) is bound by the bytes of the weight, so the only thing that matters there is streaming
values + meta once at full bandwidth: tiles are skinny in M (16, padded) and K is split until the grid
covers the GPU at least twice even for one token. Prefill uses square tiles and no split.

Four kernels share that contract; the tuner (kernels/_tuning.py) times the candidates of each per shape:
    _semi24_gemv_units_kernel  1-4 tokens, 16-bit, K % 8 == 0: 64-bit words, x selected at kept positions
    _semi24_gemv_kernel        1-4 tokens, any dtype: CUDA-core FMAs on [BLOCK_N, G] position tiles
    _semi24_dot_words_kernel   up to 32 rows per tile, 16-bit: tensor cores on a weight built as 32-bit words
    _semi24_matmul_kernel      everything else: tensor cores on four select-built position tiles
A decode kernel's speed here is its instruction count per weight group more than its tile shape (sm_90 SASS,
benchmarks/NOTES.md); `python -m sparserun.bench.offline` prints it without a GPU.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (as_2d, cdiv, check_out, dot_precision, interpreting, m_bucket, next_pow2, num_sms, on_device,
                      workspace)
from ._tuning import pick, rel_err, sample_rows
from .semi24_unpack import group_words

# ----------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------
# Tuned per (N, K, M bucket, dtype) by `_tuning.pick`, which times the whole launch: triton.autotune would
# time only the matmul kernel and so always favour the deepest split-K, whose reduce kernel it never sees.

DECODE_MAX_M = 64  # up to here the weight's bytes dominate: skinny tiles + split-K


def _split_for(tiles: int, k_steps: int, sms: int) -> int:
    """Smallest power-of-two split of K that gives >= 2 waves of programs, keeping >= 2 K steps each."""
    split = 1
    while tiles * split < 2 * sms and split < 16 and k_steps >= 4 * split:
        split *= 2
    return split


FMA_MAX_M = 4  # up to here CUDA-core FMAs are candidates; tensor cores would pad M to 16


def units_ok(k: int, dtype: torch.dtype) -> bool:
    """Can the unit GEMV run? It reads 16-bit weights as 64-bit words of 8 columns, so K % 8 == 0."""
    return k % 8 == 0 and dtype in (torch.float16, torch.bfloat16)


def candidate_configs(m: int, n: int, k: int, sms: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    out = []
    if m <= FMA_MAX_M:
        bm = next_pow2(m)
        if units_ok(k, dtype):
            # BLOCK_U = 64 units: one warp spans a step's columns (2 units per thread, 16-byte value loads), warps
            # split the rows; x's 1-D slices then share the tile's layout (any other width showed a
            # shared-memory shuffle per step in the SASS). 16-17 instructions per group of 4 at M = 1 (sm_90
            # SASS), against 39-45 for the 2-D GEMV below: that kernel is issue-bound (NOTES.md)
            for bn, warps in ((16, 4), (32, 8), (8, 4), (64, 8)):
                if bn == 64 and bm > 2:
                    continue  # 4 accumulators of 64x64: 255 registers and a 96-byte spill with Triton 3.6
                split = _split_for(cdiv(n, bn), cdiv(k // 8, 64), sms)
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_U=64, SPLIT_K=split, UNITS=True, num_warps=warps,
                                num_stages=3))
                if split > 1 and bn <= 16:
                    # the same tile without split-K: fewer programs than 2 waves, but one launch instead of two
                    # (matmul + reduce); at 8B sizes the second launch is a large part of a ~10 µs layer
                    out.append(dict(out[-1], SPLIT_K=1))
        # measured on H100 (benchmarks/results/*-semi24-decode-tune.log): few rows and a long K step per
        # program stream the weight best; wide tiles (32-64 rows x 256) ran 2x slower
        for bn, bk, warps in ((8, 1024, 4), (16, 512, 4)):
            split = _split_for(cdiv(n, bn), cdiv(k, bk), sms)
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GEMV=True, num_warps=warps,
                            num_stages=3))
    if m <= DECODE_MAX_M:
        bm = max(16, next_pow2(m))
        # Word-built tiles up to 32 rows only: at BLOCK_M = 64 (Hopper's wgmma path) Triton 3.6 fails to compile
        # them ("Illegal shared layout" in TritonGPUOptimizeDotOperands); 3.9 compiles them
        words = dtype in (torch.float16, torch.bfloat16) and bm <= 32
        if words:
            # tensor-core tiles with the weight built as 32-bit words (_semi24_dot_words_kernel): 31-38 SASS
            # instructions per group, shared by the tile's up to 64 tokens. Also tried at M <= 4, where a
            # 16-row tile serving 4 tokens can still issue fewer instructions per token than the unit GEMV
            for bn, bk, warps in ((64, 128, 4), (32, 256, 4), (64, 256, 8)):
                split = _split_for(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), sms)
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, WORDS=True, num_warps=warps,
                                num_stages=3))
        if dtype == torch.float32:
            # fp32 tiles hold twice the registers: only these fit at 16-64 rows under Triton 3.6 and 3.9
            tiles = ((32, 64, 4), (32, 128, 4)) if bm <= 16 else ((32, 64, 4),)
        elif m <= FMA_MAX_M:
            tiles = ()  # 16-bit, 1-4 tokens: the GEMVs and the word-built tiles above
        elif words:
            tiles = ((128, 64, 4),)  # 5-32 rows: one select-built tile beside the word-built ones, as a fallback
        else:
            # 16-bit, 33-64 rows: the select-built tiles (42-68 instructions per group). 128x128 takes 8 warps:
            # with 4 it spilled in the sm_90 SASS (python -m sparserun.bench.offline)
            tiles = ((64, 128, 4), (128, 64, 4), (128, 128, 8))
        if tiles:
            for bn, bk, warps in tiles:
                split = _split_for(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), sms)
                out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, USE_DOT=True, num_warps=warps,
                                num_stages=3))
    else:
        # tiles that fit the registers in the sm_90 SASS: the earlier list's BK=256 and 128x256 tiles spilled
        # 312-1640 bytes per thread (python -m sparserun.bench.offline --m 512). fp32 (exact "ieee" dots)
        # spilled kilobytes in every 16-bit tile; these two fit (Triton 3.6 also rejects BLOCK_K = 32 there)
        tiles = ((128, 128, 128, 8, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 64, 128, 4, 3)) \
            if dtype != torch.float32 else ((32, 32, 64, 4, 3), (64, 64, 64, 4, 3))
        for bm, bn, bk, warps, stages in tiles:
            out.append(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=1, USE_DOT=True, num_warps=warps,
                            num_stages=stages))
    return out


def default_config(m: int, n: int, k: int, sms: int) -> dict:
    """Used when tuning cannot run (CUDA-graph capture) and nothing is cached yet."""
    if m <= DECODE_MAX_M:
        fma = m <= FMA_MAX_M
        bm = next_pow2(m) if fma else max(16, next_pow2(m))
        bn, bk = (16, 512) if fma else (128, 128)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, USE_DOT=not fma, GEMV=fma, num_warps=4, num_stages=3,
                    SPLIT_K=_split_for(cdiv(m, bm) * cdiv(n, bn), cdiv(k, bk), sms))
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, SPLIT_K=1, USE_DOT=True, num_warps=8, num_stages=3)


def interpreter_config(m: int, n: int, k: int, dtype: torch.dtype = torch.float32) -> dict:
    """One modest config for the CPU interpreter; split K when there is K to split, so the split path and
    the reduce kernel are exercised by the CPU tests too; the unit GEMV where it can run and M <= 4, the 2-D
    GEMV for other few-row cases, tensor-core dot above."""
    if m <= FMA_MAX_M and units_ok(k, dtype):
        bu = 4
        return dict(BLOCK_M=next_pow2(m), BLOCK_N=16, BLOCK_U=bu, UNITS=True,
                    SPLIT_K=2 if k // 8 > bu else 1)
    bk = 64 if k <= 128 else 128
    fma = m <= FMA_MAX_M
    return dict(BLOCK_M=next_pow2(m) if fma else (16 if m <= 16 else 32),
                BLOCK_N=16 if n <= 16 else 32, BLOCK_K=bk, SPLIT_K=2 if k > bk else 1, USE_DOT=not fma,
                GEMV=m <= 2)


# ----------------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _split_range(steps, pid_k, SPLIT_K: tl.constexpr):
    """This program's [begin, end) of the K steps when K is split SPLIT_K ways (empty for trailing splits)."""
    per_split = tl.cdiv(steps, SPLIT_K)
    begin = pid_k * per_split
    return begin, min(begin + per_split, steps)


@triton.jit
def _store_tile(acc, bias_ptr, out_ptr, part_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, M, N,
                stride_om, stride_on, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the tensor-core kernels: acc [BLOCK_M, BLOCK_N] (+ bias) to out, or to this split's partials.
    Every split writes its slice (zeros if it had no K steps), so the reduce reads no garbage."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        # row offsets in int64: M * N reaches 2**31 in a long prefill (131072 tokens x 28672 features)
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :], acc, mask=mask)


@triton.jit
def _store_gemv_rows(acc0, acc1, acc2, acc3, bias_ptr, out_ptr, part_ptr, offs_n, mask_n, m0, pid_k, M, N,
                     stride_om, stride_on, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    """Epilogue of the GEMVs: row r of the token tile is sum(acc_r, axis=1) (+ bias), to out or to partials."""
    if HAS_BIAS and SPLIT_K == 1:
        b = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r in tl.static_range(BLOCK_M):
        if r == 0:
            y = tl.sum(acc0, axis=1) + b
        elif r == 1:
            y = tl.sum(acc1, axis=1) + b
        elif r == 2:
            y = tl.sum(acc2, axis=1) + b
        else:
            y = tl.sum(acc3, axis=1) + b
        ok = mask_n & ((m0 + r + 0 * offs_n) < M)  # a tensor: the interpreter rejects a scalar mask
        if SPLIT_K == 1:
            tl.store(out_ptr + (m0 + r) * stride_om + offs_n * stride_on, y.to(out_ptr.dtype.element_ty),
                     mask=ok)
        else:
            tl.store(part_ptr + pid_k * M * N + (m0 + r) * N + offs_n, y, mask=ok)

@triton.jit
def _load_groups(vals_ptr, meta_ptr, offs_n, g, mask_w, stride_vn, stride_mn, wdt, PAIRED: tl.constexpr):
    """Rows offs_n, groups g: the two stored values (v0, v1) and their in-group positions (i0, i1), each a
    [len(offs_n), len(g)] tile. PAIRED: values read as one 32-bit word per group (16-bit weights)."""
    if PAIRED:
        pair = tl.load(vals_ptr + offs_n[:, None] * stride_vn + g[None, :], mask=mask_w, other=0)
        v0 = (pair & 0xFFFF).to(tl.uint16).to(wdt, bitcast=True)
        v1 = ((pair >> 16) & 0xFFFF).to(tl.uint16).to(wdt, bitcast=True)
    else:
        vp = vals_ptr + offs_n[:, None] * stride_vn + 2 * g[None, :]
        v0 = tl.load(vp, mask=mask_w, other=0.0)
        v1 = tl.load(vp + 1, mask=mask_w, other=0.0)
    # group 2j's nibble is the low half of meta byte j
    mb = tl.load(meta_ptr + offs_n[:, None] * stride_mn + (g // 2)[None, :], mask=mask_w, other=0)
    nib = (mb.to(tl.int32) >> ((g & 1) * 4)[None, :]) & 0xF
    return v0, v1, nib & 3, nib >> 2


@triton.jit
def _semi24_matmul_kernel(
    # pointers
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr, part_ptr,
    # sizes: K is the true in_features, NG = groups of 4 per row (padded K / 4), MB = meta row length
    M, N, K, NG, MB,
    # strides (values' row stride counts its own elements: pairs when PAIRED)
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
    # meta-parameters
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, PAIRED: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """x [M, K], values [N, 2*NG] (or, PAIRED, int32 [N, NG]: both 16-bit values of a group in one word),
    meta [N, MB] uint8, bias [N], out [M, N]; part [SPLIT_K, M, N] fp32 when SPLIT_K > 1."""
    # ------------------------------------------------------------------------------------------------
    # tile of this program: grouped ordering so programs running together share x rows in L2
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # this tile's first row of x as a pointer (int64: M * K can pass 2**31 in a long prefill); rows within the
    # tile stay int32 offsets from it, so the loop's address arithmetic is what it was
    x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N

    # ------------------------------------------------------------------------------------------------
    # this split's range of K steps
    k_begin, k_end = _split_range(tl.cdiv(K, BLOCK_K), pid_k, SPLIT_K)

    G: tl.constexpr = BLOCK_K // 4  # groups of 4 per step
    offs_g = tl.arange(0, G)
    wdt = x_ptr.dtype.element_ty
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, G), dtype=tl.float32)
    for ks in range(k_begin, k_end):
        g = ks * G + offs_g  # group index along the row
        mask_w = mask_n[:, None] & (g[None, :] < NG)
        # -------------------------------------------------------------------------------------------
        # compressed weight: the two values and two positions of each group, as [BLOCK_N, G] tiles
        v0, v1, i0, i1 = _load_groups(vals_ptr, meta_ptr, offs_n, g, mask_w, stride_vn, stride_mn, wdt, PAIRED)
        # -------------------------------------------------------------------------------------------
        # dense weight split by in-group position j: w_j[n, g] = W[n, 4g + j]; x_j[m, g] = x[m, 4g + j].
        # Four [*, G] tiles instead of one interleaved [*, 4G] tile: no register shuffles to expand.
        for j in tl.static_range(4):
            w_j = tl.where(i0 == j, v0, tl.where(i1 == j, v1, 0.0)).to(wdt)
            kk = 4 * g + j
            x_j = tl.load(x_tile + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                          mask=mask_m[:, None] & (kk[None, :] < K), other=0.0)
            if USE_DOT:
                acc += tl.dot(x_j, tl.trans(w_j), input_precision=DOT_PRECISION)
            else:
                # a handful of tokens: CUDA-core FMAs beat padding M to the 16 rows a tensor-core op needs
                acc3 += x_j.to(tl.float32)[:, None, :] * w_j.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)

    # ------------------------------------------------------------------------------------------------
    # epilogue
    _store_tile(acc, bias_ptr, out_ptr, part_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, M, N, stride_om, stride_on,
                HAS_BIAS, SPLIT_K)


@triton.jit
def _semi24_gemv_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, NG, MB,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, PAIRED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The 1-4 token case: same inputs as _semi24_matmul_kernel, but every tile stays 2-D [BLOCK_N, G]
    in one register layout (one accumulator per token, x read as 1-D slices), so nothing is broadcast
    through a 3-D layout or reshuffled through shared memory; the rows of x are few enough to unroll."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_begin, k_end = _split_range(tl.cdiv(K, BLOCK_K), pid_k, SPLIT_K)
    G: tl.constexpr = BLOCK_K // 4
    offs_g = tl.arange(0, G)
    wdt = x_ptr.dtype.element_ty
    acc0 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, G), dtype=tl.float32)
    for ks in range(k_begin, k_end):
        g = ks * G + offs_g
        mask_w = mask_n[:, None] & (g[None, :] < NG)
        v0, v1, i0, i1 = _load_groups(vals_ptr, meta_ptr, offs_n, g, mask_w, stride_vn, stride_mn, wdt, PAIRED)
        v0 = v0.to(tl.float32)
        v1 = v1.to(tl.float32)
        for j in tl.static_range(4):
            w_j = tl.where(i0 == j, v0, tl.where(i1 == j, v1, 0.0))
            kk = 4 * g + j
            xp = x_ptr + kk * stride_xk
            rows_left = kk * 0 + (M - m0)  # as a tensor (the interpreter rejects scalar masks); rows past M read 0
            acc0 += w_j * tl.load(xp + m0 * stride_xm, mask=kk < K, other=0.0).to(tl.float32)[None, :]
            if BLOCK_M > 1:
                acc1 += w_j * tl.load(xp + (m0 + 1) * stride_xm, mask=(kk < K) & (rows_left > 1),
                                      other=0.0).to(tl.float32)[None, :]
            if BLOCK_M > 2:
                acc2 += w_j * tl.load(xp + (m0 + 2) * stride_xm, mask=(kk < K) & (rows_left > 2),
                                      other=0.0).to(tl.float32)[None, :]
                acc3 += w_j * tl.load(xp + (m0 + 3) * stride_xm, mask=(kk < K) & (rows_left > 3),
                                      other=0.0).to(tl.float32)[None, :]
    _store_gemv_rows(acc0, acc1, acc2, acc3, bias_ptr, out_ptr, part_ptr, offs_n, mask_n, m0, pid_k, M, N,
                     stride_om, stride_on, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _halves(word, IS_BF16: tl.constexpr):
    """The two 16-bit floats packed in int32 `word` (low half first), as fp32."""
    if IS_BF16:
        # a bf16 is the top half of the fp32 of the same value: moving the bits is the whole conversion
        lo = (word << 16).to(tl.float32, bitcast=True)
        hi = (word & -65536).to(tl.float32, bitcast=True)
    else:
        lo = (word & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        hi = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _kept_x(nib, xa, xb, xc, xd):
    """x at a group's two kept positions, from the group's four x values and its nibble (i0 | i1 << 2).
    i0 is 0, 1 or 2 and i1 is 1, 2 or 3 (i0 < i1), so each is two bit tests and two selects: selecting x
    costs half of expanding the weight to all four positions."""
    x_first = tl.where((nib & 2) != 0, xc, tl.where((nib & 1) != 0, xb, xa))
    x_second = tl.where((nib & 8) != 0, tl.where((nib & 4) != 0, xd, xc), xb)
    return x_first, x_second


@triton.jit
def _unit_dot(acc, x_ptr, row, u, mask_u, va0, va1, vb0, vb1, na, nb, IS_BF16: tl.constexpr):
    """acc + one token's products over this step's units; x read as two int64 words (8 columns) per unit."""
    xw0 = tl.load(x_ptr + row + 2 * u, mask=mask_u, other=0)
    xw1 = tl.load(x_ptr + row + 2 * u + 1, mask=mask_u, other=0)
    x0, x1 = _halves(xw0.to(tl.int32), IS_BF16)
    x2, x3 = _halves((xw0 >> 32).to(tl.int32), IS_BF16)
    x4, x5 = _halves(xw1.to(tl.int32), IS_BF16)
    x6, x7 = _halves((xw1 >> 32).to(tl.int32), IS_BF16)
    f0, s0 = _kept_x(na, x0[None, :], x1[None, :], x2[None, :], x3[None, :])
    f1, s1 = _kept_x(nb, x4[None, :], x5[None, :], x6[None, :], x7[None, :])
    # one chain of FMAs into the accumulator (a sum of products first would cost a multiply and an add more)
    acc += va0 * f0
    acc += va1 * s0
    acc += vb0 * f1
    acc += vb1 * s1
    return acc


@triton.jit
def _semi24_gemv_units_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, KU,
    stride_xm, stride_vn, stride_mn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_U: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """The 1-4 token case of 16-bit weights with K % 8 == 0, in *units* of 8 columns (2 groups):
    x int64 [M, 2*KU] (4 x values per word), values int64 [N, KU] (a unit's 4 kept values), meta uint8 [N, KU]
    (a unit's two nibbles), bias [N], out [M, N], part [SPLIT_K, M, N] fp32 when SPLIT_K > 1.
    Whole-word loads and bit moves instead of per-group byte gathers and converts; x selected at the kept
    positions instead of the weight expanded to all four (see _kept_x)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m0 = tl.program_id(2) * BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k_begin, k_end = _split_range(tl.cdiv(KU, BLOCK_U), pid_k, SPLIT_K)
    offs_u = tl.arange(0, BLOCK_U)
    acc0 = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_U), dtype=tl.float32)
    for ks in range(k_begin, k_end):
        u = ks * BLOCK_U + offs_u
        if EVEN_K:
            mask_u = tl.full((BLOCK_U,), 1, tl.int1)  # constant: the masks fold away
        else:
            mask_u = u < KU
        vp = vals_ptr + offs_n[:, None] * stride_vn + u[None, :]
        # meta offsets claim runs of 2 only: the byte load then takes the values' per-thread layout (2 units)
        # instead of a 16-byte vector that would need a shuffle through shared memory to line up with them
        mp = meta_ptr + offs_n[:, None] * stride_mn + tl.max_contiguous(u, 2)[None, :]
        if EVEN_N and EVEN_K:
            w = tl.load(vp)
            mb = tl.load(mp)
        else:
            mw = mask_n[:, None] & mask_u[None, :]
            w = tl.load(vp, mask=mw, other=0)
            mb = tl.load(mp, mask=mw, other=0)
        va0, va1 = _halves(w.to(tl.int32), IS_BF16)  # group 2u: the low word
        vb0, vb1 = _halves((w >> 32).to(tl.int32), IS_BF16)  # group 2u + 1
        nib = mb.to(tl.int32)
        na = nib & 15
        nb = nib >> 4
        acc0 = _unit_dot(acc0, x_ptr, m0 * stride_xm, u, mask_u, va0, va1, vb0, vb1, na, nb, IS_BF16)
        # rows m0 + r >= M (M = 3 in a tile of 4) read zeros: the row test is a tensor, as the interpreter wants
        if BLOCK_M > 1:
            acc1 = _unit_dot(acc1, x_ptr, (m0 + 1) * stride_xm, u, mask_u & (m0 + 1 + 0 * u < M),
                             va0, va1, vb0, vb1, na, nb, IS_BF16)
        if BLOCK_M > 2:
            acc2 = _unit_dot(acc2, x_ptr, (m0 + 2) * stride_xm, u, mask_u & (m0 + 2 + 0 * u < M),
                             va0, va1, vb0, vb1, na, nb, IS_BF16)
            acc3 = _unit_dot(acc3, x_ptr, (m0 + 3) * stride_xm, u, mask_u & (m0 + 3 + 0 * u < M),
                             va0, va1, vb0, vb1, na, nb, IS_BF16)
    _store_gemv_rows(acc0, acc1, acc2, acc3, bias_ptr, out_ptr, part_ptr, offs_n, mask_n, m0, pid_k, M, N,
                     stride_om, stride_on, HAS_BIAS, BLOCK_M, BLOCK_N, SPLIT_K)


@triton.jit
def _words_to_pairs(w, R: tl.constexpr, C: tl.constexpr, wdt: tl.constexpr):
    """int32 [R, C] -> [R, 2C] 16-bit floats, each word's low half first (a bit move, no conversion)."""
    lo = (w & 0xFFFF).to(tl.uint16).to(wdt, bitcast=True)
    hi = ((w >> 16) & 0xFFFF).to(tl.uint16).to(wdt, bitcast=True)
    return tl.reshape(tl.join(lo, hi), (R, 2 * C))


@triton.jit
def _semi24_dot_words_kernel(
    x_ptr, vals_ptr, meta_ptr, bias_ptr, out_ptr, part_ptr,
    M, N, K, NG,
    stride_xm, stride_xk, stride_vn, stride_mn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """Tensor-core tiles for a few to 64 tokens, 16-bit weights: x [M, K], values int32 [N, NG] (a group's two
    values in one word), meta [N, ceil(NG/2)] uint8, out [M, N], part [SPLIT_K, M, N] fp32.

    The dense weight is built as 32-bit words, not as four position tiles: for each group, word a holds
    columns (0, 1) and word b columns (2, 3) (semi24_unpack.group_words: the stored pair, one half of it moved,
    or zero). The words reinterpret as [N, 2G] halves, and x is read in the same column order (4g, 4g+1 and
    4g+2, 4g+3): two dots per step instead of four, 31-38 SASS instructions per group against 42-62 for
    _semi24_matmul_kernel's selects (sm_90, python -m sparserun.bench.offline)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # this tile's first row of x as a pointer (int64: M * K can pass 2**31 in a long prefill); rows within the
    # tile stay int32 offsets from it, so the loop's address arithmetic is what it was
    x_tile = x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
    rows = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_begin, k_end = _split_range(tl.cdiv(K, BLOCK_K), pid_k, SPLIT_K)
    G: tl.constexpr = BLOCK_K // 4
    offs_g = tl.arange(0, G)
    c2 = tl.arange(0, 2 * G)
    pair_col = 4 * (c2 // 2) + (c2 % 2)  # columns 4g and 4g + 1, in the order of the words' halves
    wdt = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for ks in range(k_begin, k_end):
        g = ks * G + offs_g
        vp = vals_ptr + offs_n[:, None] * stride_vn + g[None, :]
        mp = meta_ptr + offs_n[:, None] * stride_mn + (g // 2)[None, :]
        cols = ks * BLOCK_K + pair_col
        xp = x_tile + rows[:, None] * stride_xm + cols[None, :] * stride_xk
        if EVEN_N and EVEN_K:
            p = tl.load(vp)
            mb = tl.load(mp)
        else:
            mask_w = mask_n[:, None] & (g < NG)[None, :]
            p = tl.load(vp, mask=mask_w, other=0)
            mb = tl.load(mp, mask=mask_w, other=0)
        if EVEN_K:
            xa = tl.load(xp, mask=mask_m[:, None], other=0.0)
            xb = tl.load(xp + 2 * stride_xk, mask=mask_m[:, None], other=0.0)
        else:
            xa = tl.load(xp, mask=mask_m[:, None] & (cols < K)[None, :], other=0.0)
            xb = tl.load(xp + 2 * stride_xk, mask=mask_m[:, None] & (cols + 2 < K)[None, :], other=0.0)
        a, b = group_words(p, (mb.to(tl.int32) >> ((g & 1) * 4)[None, :]) & 0xF)
        acc += tl.dot(xa, tl.trans(_words_to_pairs(a, BLOCK_N, G, wdt)))
        acc += tl.dot(xb, tl.trans(_words_to_pairs(b, BLOCK_N, G, wdt)))
    _store_tile(acc, bias_ptr, out_ptr, part_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, M, N, stride_om, stride_on,
                HAS_BIAS, SPLIT_K)


@triton.jit
def _splitk_reduce_kernel(part_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on, SPLIT,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out[m, n] = sum_s part[s, m, n] (+ bias[n]), cast to the output dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + (offs // N).to(tl.int64) * stride_om + n * stride_on, acc.to(out_ptr.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------


def _as_words(x2: torch.Tensor) -> torch.Tensor:
    """x [M, K] 16-bit as int64 [M, K/4] (4 values per word) for the unit GEMV; rows that are not whole
    aligned words (a column slice, a transposed x) are copied first: at decode that is a few KB."""
    try:
        return x2.view(torch.int64)
    except RuntimeError:
        return x2.clone(memory_format=torch.contiguous_format).view(torch.int64)


def semi24_matmul(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                  bias: torch.Tensor | None = None, config: dict | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · Wᵀ (+ bias) for W [N, k] packed as (values [N, Kp/2], meta [N, ceil(Kp/8)] uint8).

    x: [..., k] float16/bfloat16/float32 (any strides); returns [..., N] in x's dtype.
    `config` forces a kernel config (tests, benchmarks); otherwise tuned per (N, K, M bucket).
    `out`: optional [M, N] output to write (M = x rows flattened).
    """
    n, kp2 = values.shape
    if kp2 * 2 != (k + 3) // 4 * 4:
        raise ValueError(f"semi24_matmul: values has {kp2} columns, expected {((k + 3) // 4 * 4) // 2} "
                         f"for in_features {k}")
    if meta.dtype != torch.uint8 or meta.shape != (n, (kp2 // 2 + 1) // 2):
        raise ValueError(f"semi24_matmul: meta must be uint8 {(n, (kp2 // 2 + 1) // 2)}, got {meta.dtype} "
                         f"{tuple(meta.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(f"semi24_matmul: x dtype {x.dtype} != weight dtype {values.dtype}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"semi24_matmul: bias shape {tuple(bias.shape)} != ({n},)")
    device = on_device("semi24_matmul", x, values=values, meta=meta, bias=bias, out=out)
    x2 = as_2d(x, k, "semi24_matmul")
    values, meta = values.contiguous(), meta.contiguous()
    m = x2.shape[0]
    out = check_out(out, m, n, x)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    has_bias = bias is not None
    bias_arg = bias if has_bias else values  # never read when HAS_BIAS is False
    # 16-bit values are read as one 32-bit word per group: full-width vector loads of the weight stream
    paired = values.element_size() == 2
    vals_arg = values.view(torch.int32) if paired else values

    def launch(cfg: dict) -> torch.Tensor:
        cfg = dict(cfg)
        launch_kw = {kk: cfg.pop(kk) for kk in ("num_warps", "num_stages") if kk in cfg}
        split = cfg["SPLIT_K"]
        part = workspace((split, m, n), x.device) if split > 1 else out
        if cfg.pop("UNITS", False):
            if not units_ok(k, x.dtype):
                raise ValueError(f"semi24_matmul: the unit GEMV needs float16/bfloat16 and in_features % 8 == 0, "
                                 f"got {x.dtype}, {k}")
            xw = _as_words(x2)
            ku = k // 8
            grid = (cdiv(n, cfg["BLOCK_N"]), split, cdiv(m, cfg["BLOCK_M"]))
            _semi24_gemv_units_kernel[grid](
                xw, values.view(torch.int64), meta, bias_arg, out, part, m, n, ku,
                xw.stride(0), ku, meta.stride(0), out.stride(0), out.stride(1),
                HAS_BIAS=has_bias, IS_BF16=x.dtype == torch.bfloat16, EVEN_N=n % cfg["BLOCK_N"] == 0,
                EVEN_K=ku % cfg["BLOCK_U"] == 0, **cfg, **launch_kw)
        elif cfg.pop("WORDS", False):
            if not paired:
                raise ValueError(f"semi24_matmul: the word-built dot tiles need float16/bfloat16, got {x.dtype}")
            cfg.pop("USE_DOT", None)
            grid = (cdiv(n, cfg["BLOCK_N"]), split, cdiv(m, cfg["BLOCK_M"]))
            _semi24_dot_words_kernel[grid](
                x2, vals_arg, meta, bias_arg, out, part, m, n, k, kp2 // 2,
                x2.stride(0), x2.stride(1), vals_arg.stride(0), meta.stride(0), out.stride(0), out.stride(1),
                HAS_BIAS=has_bias, EVEN_N=n % cfg["BLOCK_N"] == 0, EVEN_K=k % cfg["BLOCK_K"] == 0, **cfg,
                **launch_kw)
        elif cfg.pop("GEMV", False):
            cfg.pop("USE_DOT", None)
            grid = (cdiv(n, cfg["BLOCK_N"]), split, cdiv(m, cfg["BLOCK_M"]))
            _semi24_gemv_kernel[grid](
                x2, vals_arg, meta, bias_arg, out, part, m, n, k, kp2 // 2, meta.shape[1],
                x2.stride(0), x2.stride(1), vals_arg.stride(0), meta.stride(0), out.stride(0), out.stride(1),
                HAS_BIAS=has_bias, PAIRED=paired, **cfg, **launch_kw)
        else:
            grid = (cdiv(m, cfg["BLOCK_M"]) * cdiv(n, cfg["BLOCK_N"]), split)
            _semi24_matmul_kernel[grid](
                x2, vals_arg, meta, bias_arg, out, part, m, n, k, kp2 // 2, meta.shape[1],
                x2.stride(0), x2.stride(1), vals_arg.stride(0), meta.stride(0), out.stride(0), out.stride(1),
                HAS_BIAS=has_bias, DOT_PRECISION=dot_precision(x.dtype), PAIRED=paired, GROUP_M=8, **cfg,
                **launch_kw)
        if split > 1:
            block = 1024
            _splitk_reduce_kernel[(cdiv(m * n, block),)](
                part, bias_arg, out, m, n, out.stride(0), out.stride(1), split, HAS_BIAS=has_bias,
                BLOCK=block)
        return out

    def check(y: torch.Tensor) -> float:
        """Relative error of sampled output rows and columns against the pure-torch reference (tuning only)."""
        rm, rn = sample_rows(m), sample_rows(n)
        ref = semi24_matmul_ref(x2[rm], values[rn], meta[rn], k, bias[rn] if has_bias else None, upcast=False,
                                acc=torch.float32)
        return rel_err(y[rm][:, rn], ref)

    with device:
        if config is None:
            if interpreting():
                config = interpreter_config(m, n, k, x.dtype)
            else:
                sms = num_sms(x)
                key = ("semi24", n, k, m_bucket(m), x.dtype, has_bias, str(x.device))
                mb = m_bucket(m)
                config = pick(key, lambda: candidate_configs(mb, n, k, sms, x.dtype), launch,
                              lambda: default_config(mb, n, k, sms), check)
        launch(config)
    return out.reshape(*x.shape[:-1], n)


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def semi24_unpack_ref(values: torch.Tensor, meta: torch.Tensor, k: int) -> torch.Tensor:
    """Dense [N, k] weight from the packed tensors, in pure torch (independent of formats.semi24)."""
    n, kp2 = values.shape
    g = kp2 // 2
    byte = meta.to(torch.int64)
    nib = torch.stack([byte & 0xF, byte >> 4], dim=-1).reshape(n, -1)[:, :g]
    dense = torch.zeros(n, g, 4, dtype=values.dtype, device=values.device)
    vals = values.reshape(n, g, 2)
    dense.scatter_(-1, (nib & 3)[..., None], vals[..., :1])
    dense.scatter_(-1, (nib >> 2)[..., None], vals[..., 1:])
    return dense.reshape(n, g * 4)[:, :k]


def semi24_matmul_ref(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, k: int,
                      bias: torch.Tensor | None = None, upcast: bool = True,
                      acc: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch y = x · Wᵀ (+ bias); float64 when `upcast` (the test oracle), else in `acc` (default x's
    dtype)."""
    w = semi24_unpack_ref(values, meta, k)
    dt = torch.float64 if upcast else (acc or x.dtype)
    y = x.to(dt) @ w.to(dt).T
    if bias is not None:
        y = y + bias.to(dt)
    return y
