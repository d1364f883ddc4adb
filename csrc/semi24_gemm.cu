// 2:4 sparse tensor-core GEMM:  y[M, N] = x[M, K] · Wᵀ (+ bias),  W [N, K] stored 2:4 (two of every four
// along K kept), fp16 or bf16 in, fp32 accumulate, result in the input dtype.
//
// No torch headers: this file is plain CUDA C++ so CI can compile-check it with `nvcc -c` on a CPU
// machine; csrc/semi24_binding.cpp wraps the C launcher below for torch.
//
// ---- the mapping onto mma.sp ------------------------------------------------------------------------
// mma.sp.m16n8k32 computes D[16x8] += A[16x32, 2:4 sparse] · B[32x8]; only A may be sparse. The weight is
// the sparse operand, so the kernel computes yᵀ = W · xᵀ: mma rows are output features (16 per mma),
// mma columns are tokens (8 per mma), so a decode step (M = 1..8) wastes at most 7/8 of one narrow tile.
//
// ---- operand layouts (produced at load time by sparserun/runtime/cuda_ext.py::repack) -------------------
// Let Np = N rounded up to 128 (the largest block tile), KS = ceil(Kp / 32) mma k-steps (Kp = K rounded up
// to 4; pad columns hold value 0 with positions (0,1)).
//   vf [Np/16, KS, 32 lanes, 8] (weight dtype): the A fragment of every (16-row tile, k-step), in register
//      order, so one 16-byte load per lane fills a thread's four A registers. A 16x32 sparse tile is held
//      compressed as 16x16 (column c of the compressed tile = value c of the row's 16 stored values in this
//      k-step, i.e. group c/2). PTX lays the compressed A out like a dense m16n8k16 A: lane = 4g + t,
//          reg0 = (row g,   cols 2t, 2t+1)   reg1 = (row g+8, cols 2t, 2t+1)
//          reg2 = (row g,   cols 2t+8, 2t+9) reg3 = (row g+8, cols 2t+8, 2t+9)
//      (low half of each register = the lower column).
//   ef [Np/16, KS, 16] (uint32): the metadata register `e` of every (16-row tile, k-step). With sparsity
//      selector 0 only threads t = 0 and 1 of each quad supply metadata; word j = 2g + t is lane (4g+t)'s:
//          bits  0..15 = row g,   logical columns 16t .. 16t+15  (4 groups x 4-bit nibble, group 0 lowest)
//          bits 16..31 = row g+8, logical columns 16t .. 16t+15
//      A nibble is i0 | i1 << 2 with i0 < i1 the in-group positions of the two stored values: exactly the
//      portable disk nibble (docs/format.md), and the increasing order `.sp::ordered_metadata` requires.
//      So a 16-bit half is two consecutive bytes of the disk `meta` of that row, unchanged.
//   x  [M, K] row-major, row stride ldx (elements), K % 8 == 0, 16-byte aligned rows (the Python op pads).
//   y  [M, N] row-major, row stride ldy; bias [N] or null.
// The B fragment (xᵀ, ".col") for one 8-token tile and k-step: reg j = x[token g, k = 8j + 2t, +1], which is
// what ldmatrix.x4 (non-transposed) returns from a [token][k] shared-memory tile.
//
// ---- the kernel -------------------------------------------------------------------------------------------
// One CTA computes a BN (features) x BM (tokens) tile of yᵀ, looping over K in BK-wide tiles through a
// STAGES-deep cp.async pipeline (A fragments, metadata and x all land in shared memory; x rows are
// XOR-swizzled by 16-byte chunk so ldmatrix is bank-conflict free). Warps are arranged WARPS_N x WARPS_M
// over the output tile and WARPS_K ways over the k-steps of each K tile (an in-CTA split-K for the skinny
// decode tile; partial sums are added through shared memory). The epilogue adds the bias, converts, stages
// the tile in shared memory and writes 16-byte coalesced rows of y (scalar stores at ragged N).
// Tails: tokens past M and x columns past K are zero-filled by cp.async (src-size 0) and never stored;
// k-steps past KS are skipped (warp-uniform); features past N are padding rows of vf/ef and never stored.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#if (__CUDACC_VER_MAJOR__ > 12) || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 5)
// PTX 8.5+: the ordered-metadata form; the plain `.sp` form draws an advisory from ptxas ("substantially
// reduced performance on some future architectures"). Our nibbles are always ordered (i0 < i1).
#define SPARSERUN_MMA_SP "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32."
#else
#define SPARSERUN_MMA_SP "mma.sp.sync.aligned.m16n8k32.row.col.f32."
#endif

// Error codes (keep in sync with sparserun_semi24_error_string and sparserun/runtime/cuda_ext.py).
#define SR_OK 0
#define SR_BAD_SHAPE 1
#define SR_BAD_DTYPE 2
#define SR_BAD_ALIGNMENT 3
#define SR_UNSUPPORTED_ARCH 4
#define SR_BAD_CONFIG 5
#define SR_LAUNCH_FAILED 6
#define SR_CUDA_ERROR 7

namespace {

// ---- PTX helpers ------------------------------------------------------------------------------------------

// 16-byte global->shared copy that bypasses L1 (.cg: streamed operands are read once per CTA); with
// src_bytes = 0 nothing is read and the destination is zero-filled, which is how tails become zeros.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const int n = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices from shared memory; lane l gives the row address of matrix l/8, row l%8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <typename T>
struct Mma;

// d += A(2:4, 16x32) · B(32x8); sparsity selector 0 (threads 0 and 1 of each quad hold the metadata).
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(SPARSERUN_MMA_SP
                 "f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  }
  static __device__ __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ float tof(__half v) { return __half2float(v); }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint4& a, const uint32_t (&b)[4],
                                             uint32_t e) {
    asm volatile(SPARSERUN_MMA_SP
                 "bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9, %10, %11}, "
                 "{%0, %1, %2, %3}, %12, 0x0;\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a.x), "r"(a.y), "r"(a.z), "r"(a.w), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]),
                   "r"(e));
  }
  static __device__ __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ float tof(__nv_bfloat16 v) { return __bfloat162float(v); }
};

// ---- tile configurations ----------------------------------------------------------------------------------

constexpr int cmax(int a, int b) { return a > b ? a : b; }

template <int BN_, int BM_, int BK_, int WN_, int WM_, int WK_, int STAGES_>
struct Cfg {
  static constexpr int BN = BN_;            // features (rows of W) per CTA
  static constexpr int BM = BM_;            // tokens (rows of x) per CTA
  static constexpr int BK = BK_;            // logical K per pipeline stage
  static constexpr int WARPS_N = WN_, WARPS_M = WM_, WARPS_K = WK_;
  static constexpr int STAGES = STAGES_;
  static constexpr int THREADS = WN_ * WM_ * WK_ * 32;
  static constexpr int KSTEPS = BK / 32;    // mma k-steps per stage
  static constexpr int RT = BN / 16;        // 16-row tiles per CTA
  static constexpr int WTN = BN / WARPS_N;  // features per warp
  static constexpr int WTM = BM / WARPS_M;  // tokens per warp
  static constexpr int FI = WTN / 16;       // mma tiles per warp along features
  static constexpr int FJ = WTM / 8;        // mma tiles per warp along tokens
  static constexpr int XCH = BK / 8;        // 16-byte chunks per x row in a stage
  static constexpr int A_BYTES = RT * KSTEPS * 512;
  static constexpr int E_BYTES = RT * KSTEPS * 64;
  static constexpr int X_BYTES = BM * BK * 2;
  static constexpr int STAGE_BYTES = A_BYTES + E_BYTES + X_BYTES;
  static constexpr int ACC = FI * FJ * 4;   // fp32 accumulators per thread
  static constexpr int RED_BYTES = (WARPS_K - 1) * WARPS_N * WARPS_M * 32 * ACC * 4;
  static constexpr int OUT_LD = BN + 8;     // staged output row (elements); +8 keeps rows 16 B aligned
  static constexpr int OUT_BYTES = BM * OUT_LD * 2;
  static constexpr int SMEM = cmax(STAGES * STAGE_BYTES, RED_BYTES + OUT_BYTES);

  static_assert(BN % (16 * WARPS_N) == 0 && BM % (8 * WARPS_M) == 0, "warp tile must be whole mmas");
  static_assert(BK % 32 == 0 && KSTEPS % WARPS_K == 0, "k-steps must split evenly over k-warps");
  static_assert(XCH >= 8, "swizzle needs at least 8 chunks per x row");
  static_assert(128 % BN == 0, "vf/ef rows are padded to 128: BN must divide it");
  static_assert(STAGES >= 2, "pipeline needs two stages");
};

// Config 0: decode / small M (M <= 16): narrow token tile, 8 warps split K four ways so 128-row W slabs
//           stream with many loads in flight.
// Config 1: medium M: 64x64 tile, 4 warps, 4 stages.
// Config 2: prefill: 128 features x 128 tokens x 64 K, 8 warps (2 x 4), each 64x32, 3 stages.
using Cfg0 = Cfg<32, 16, 128, 2, 1, 4, 4>;
using Cfg1 = Cfg<64, 64, 64, 2, 2, 1, 4>;
using Cfg2 = Cfg<128, 128, 64, 2, 4, 1, 3>;
constexpr int NUM_CONFIGS = 3;

struct Params {
  const void* x;
  const void* vf;
  const void* ef;
  const void* bias;
  void* y;
  long long ldx, ldy;
  int M, N, K, k_steps;
};

// ---- the kernel -------------------------------------------------------------------------------------------

template <typename T, typename C>
__global__ void __launch_bounds__(C::THREADS) semi24_gemm_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wnm = warp % (C::WARPS_N * C::WARPS_M);
  const int kw = warp / (C::WARPS_N * C::WARPS_M);
  const int wn = wnm % C::WARPS_N;
  const int wm = wnm / C::WARPS_N;

  const int rt0 = blockIdx.x * C::RT;        // first 16-row tile of W
  const int n0 = blockIdx.x * C::BN;         // first feature
  const int m0 = blockIdx.y * C::BM;         // first token
  const int k_steps = p.k_steps;
  const int k_tiles = (k_steps + C::KSTEPS - 1) / C::KSTEPS;

  const T* __restrict__ x = static_cast<const T*>(p.x);
  const uint4* __restrict__ vf = static_cast<const uint4*>(p.vf);
  const uint4* __restrict__ ef = static_cast<const uint4*>(p.ef);

  auto stage_a = [&](int s) { return reinterpret_cast<uint4*>(smem + s * C::STAGE_BYTES); };
  auto stage_e = [&](int s) {
    return reinterpret_cast<uint32_t*>(smem + s * C::STAGE_BYTES + C::A_BYTES);
  };
  auto stage_x = [&](int s) {
    return reinterpret_cast<T*>(smem + s * C::STAGE_BYTES + C::A_BYTES + C::E_BYTES);
  };

  // Issue the copies of K tile `kt` into stage `s` (no commit).
  auto load_tile = [&](int s, int kt) {
    const int ks0 = kt * C::KSTEPS;
    uint4* sa = stage_a(s);
    uint4* se = reinterpret_cast<uint4*>(stage_e(s));
    T* sx = stage_x(s);
#pragma unroll
    for (int idx = tid; idx < C::RT * C::KSTEPS * 32; idx += C::THREADS) {
      const int c = idx % 32, j = (idx / 32) % C::KSTEPS, i = idx / (32 * C::KSTEPS);
      const int gks = ks0 + j;
      if (gks < k_steps)
        cp_async16(sa + (i * C::KSTEPS + j) * 32 + c,
                   vf + ((long long)(rt0 + i) * k_steps + gks) * 32 + c, true);
    }
#pragma unroll
    for (int idx = tid; idx < C::RT * C::KSTEPS * 4; idx += C::THREADS) {
      const int c = idx % 4, j = (idx / 4) % C::KSTEPS, i = idx / (4 * C::KSTEPS);
      const int gks = ks0 + j;
      if (gks < k_steps)
        cp_async16(se + (i * C::KSTEPS + j) * 4 + c, ef + ((long long)(rt0 + i) * k_steps + gks) * 4 + c,
                   true);
    }
#pragma unroll
    for (int idx = tid; idx < C::BM * C::XCH; idx += C::THREADS) {
      const int c = idx % C::XCH, r = idx / C::XCH;
      const int m = m0 + r;
      const int k = kt * C::BK + c * 8;
      const bool ok = (m < p.M) && (k < p.K);  // K % 8 == 0: a chunk is wholly in or out
      const T* src = ok ? x + (long long)m * p.ldx + k : x;
      cp_async16(sx + r * C::BK + ((c ^ (r & 7)) * 8), src, ok);
    }
  };

  float acc[C::FI][C::FJ][4];
#pragma unroll
  for (int i = 0; i < C::FI; ++i)
#pragma unroll
    for (int j = 0; j < C::FJ; ++j)
#pragma unroll
      for (int h = 0; h < 4; ++h) acc[i][j][h] = 0.f;

  // ---- prologue: fill STAGES-1 stages -------------------------------------------------------------------
#pragma unroll
  for (int s = 0; s < C::STAGES - 1; ++s) {
    if (s < k_tiles) load_tile(s, s);
    cp_async_commit();  // always commit, so the group count below stays uniform
  }

  // ---- main loop ---------------------------------------------------------------------------------------
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<C::STAGES - 2>();
    __syncthreads();  // tile kt visible to all; every warp is done with the stage refilled below
    {
      const int nk = kt + C::STAGES - 1;
      if (nk < k_tiles) load_tile(nk % C::STAGES, nk);
      cp_async_commit();
    }
    const int s = kt % C::STAGES;
    const uint4* sa = stage_a(s);
    const uint32_t* se = stage_e(s);
    const T* sx = stage_x(s);
#pragma unroll
    for (int kl = kw; kl < C::KSTEPS; kl += C::WARPS_K) {
      if (kt * C::KSTEPS + kl >= k_steps) break;  // ragged last tile; warp-uniform
      uint4 a[C::FI];
      uint32_t e[C::FI];
      uint32_t b[C::FJ][4];
#pragma unroll
      for (int i = 0; i < C::FI; ++i) {
        const int rt = wn * C::FI + i;
        a[i] = sa[(rt * C::KSTEPS + kl) * 32 + lane];
        e[i] = se[(rt * C::KSTEPS + kl) * 16 + (lane >> 2) * 2 + (lane & 1)];
      }
#pragma unroll
      for (int j = 0; j < C::FJ; ++j) {
        const int tok = wm * C::WTM + j * 8 + (lane & 7);
        const int chunk = kl * 4 + (lane >> 3);
        ldmatrix_x4(b[j], sx + tok * C::BK + ((chunk ^ (tok & 7)) * 8));
      }
#pragma unroll
      for (int i = 0; i < C::FI; ++i)
#pragma unroll
        for (int j = 0; j < C::FJ; ++j) Mma<T>::run(acc[i][j], a[i], b[j], e[i]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers are reused below

  // ---- epilogue: split-K reduction, bias, convert, stage, coalesced store ---------------------------------
  constexpr int NWNM = C::WARPS_N * C::WARPS_M;
  if (C::WARPS_K > 1) {
    float* red = reinterpret_cast<float*>(smem);
    if (kw > 0) {
#pragma unroll
      for (int i = 0; i < C::FI; ++i)
#pragma unroll
        for (int j = 0; j < C::FJ; ++j)
#pragma unroll
          for (int h = 0; h < 4; ++h) {
            const int r = (i * C::FJ + j) * 4 + h;
            red[(((kw - 1) * NWNM + wnm) * C::ACC + r) * 32 + lane] = acc[i][j][h];
          }
    }
    __syncthreads();
    if (kw == 0) {
      for (int kk = 0; kk < C::WARPS_K - 1; ++kk)
#pragma unroll
        for (int i = 0; i < C::FI; ++i)
#pragma unroll
          for (int j = 0; j < C::FJ; ++j)
#pragma unroll
            for (int h = 0; h < 4; ++h) {
              const int r = (i * C::FJ + j) * 4 + h;
              acc[i][j][h] += red[((kk * NWNM + wnm) * C::ACC + r) * 32 + lane];
            }
    }
  }
  T* so = reinterpret_cast<T*>(smem + C::RED_BYTES);
  const T* bias = static_cast<const T*>(p.bias);
  if (kw == 0) {
#pragma unroll
    for (int i = 0; i < C::FI; ++i) {
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int f = wn * C::WTN + i * 16 + (lane >> 2) + hi * 8;  // feature within the tile
        const float bv = (bias != nullptr && n0 + f < p.N) ? Mma<T>::tof(bias[n0 + f]) : 0.f;
#pragma unroll
        for (int j = 0; j < C::FJ; ++j)
#pragma unroll
          for (int lo = 0; lo < 2; ++lo) {
            const int t = wm * C::WTM + j * 8 + (lane & 3) * 2 + lo;  // token within the tile
            so[t * C::OUT_LD + f] = Mma<T>::cvt(acc[i][j][hi * 2 + lo] + bv);
          }
      }
    }
  }
  __syncthreads();
  T* y = static_cast<T*>(p.y);
  const bool vec = (p.ldy % 8 == 0) && ((reinterpret_cast<uintptr_t>(p.y) & 15) == 0);
  for (int idx = tid; idx < C::BM * (C::BN / 8); idx += C::THREADS) {
    const int r = idx / (C::BN / 8), c = idx % (C::BN / 8);
    const int m = m0 + r, n = n0 + c * 8;
    if (m >= p.M || n >= p.N) continue;
    T* dst = y + (long long)m * p.ldy + n;
    const T* src = so + r * C::OUT_LD + c * 8;
    if (vec && n + 8 <= p.N) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      for (int q = 0; q < 8 && n + q < p.N; ++q) dst[q] = src[q];
    }
  }
#else
  // Built for an architecture without mma.sp (< sm_80): the launcher refuses such devices first.
  __trap();
#endif
}

// ---- host side ----------------------------------------------------------------------------------------------

constexpr int kMaxDevices = 64;

struct DeviceInfo {
  int cc = -1;          // major*10 + minor; -1 = not queried yet
  int sms = 0;
  int smem_optin = 0;   // max dynamic shared memory per block after opt-in
  bool smem_set[2][NUM_CONFIGS] = {};  // [dtype][config]: cudaFuncSetAttribute done
};

DeviceInfo g_dev[kMaxDevices];
thread_local cudaError_t g_last_cuda_error = cudaSuccess;

int device_info(DeviceInfo** out) {
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) { g_last_cuda_error = err; return SR_CUDA_ERROR; }
  if (dev < 0 || dev >= kMaxDevices) return SR_CUDA_ERROR;
  DeviceInfo& d = g_dev[dev];
  if (d.cc < 0) {
    int major = 0, minor = 0, sms = 0, optin = 0;
    if ((err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev)) != cudaSuccess ||
        (err = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev)) !=
            cudaSuccess) {
      g_last_cuda_error = err;
      return SR_CUDA_ERROR;
    }
    d.sms = sms;
    d.smem_optin = optin;
    d.cc = major * 10 + minor;  // written last: a racing thread at worst queries twice
  }
  *out = &d;
  return SR_OK;
}

template <typename T, typename C>
int launch(const Params& p, DeviceInfo& d, int dtype, int config, cudaStream_t stream) {
  if (C::SMEM > d.smem_optin) return SR_UNSUPPORTED_ARCH;
  auto kern = semi24_gemm_kernel<T, C>;
  if (!d.smem_set[dtype][config]) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, C::SMEM);
    if (err != cudaSuccess) { g_last_cuda_error = err; return SR_LAUNCH_FAILED; }
    d.smem_set[dtype][config] = true;
  }
  const long long grid_y = (p.M + C::BM - 1) / C::BM;
  if (grid_y > 65535) return SR_BAD_SHAPE;
  const dim3 grid((unsigned)((p.N + C::BN - 1) / C::BN), (unsigned)grid_y);  // rows < N padded to 128
  kern<<<grid, C::THREADS, C::SMEM, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) { g_last_cuda_error = err; return SR_LAUNCH_FAILED; }
  return SR_OK;
}

template <typename C>
long long n_ctas(int M, int N) {
  return (long long)((N + C::BN - 1) / C::BN) * ((M + C::BM - 1) / C::BM);
}

// Static choice (the measured dispatcher in sparserun/runtime/tuning.py picks between backends, not
// configs): the big tile once it still gives two waves of CTAs, the skinny tile for decode.
int pick_config(int M, int N, int sms) {
  if (M <= 16) return 0;
  if (n_ctas<Cfg2>(M, N) >= 2LL * sms) return 2;
  return 1;
}

template <typename T>
int dispatch(const Params& p, DeviceInfo& d, int dtype, int config, cudaStream_t stream) {
  switch (config) {
    case 0: return launch<T, Cfg0>(p, d, dtype, 0, stream);
    case 1: return launch<T, Cfg1>(p, d, dtype, 1, stream);
    case 2: return launch<T, Cfg2>(p, d, dtype, 2, stream);
    default: return SR_BAD_CONFIG;
  }
}

}  // namespace

extern "C" {

// y[M, N] = x[M, K] · Wᵀ + bias, W given as the repacked (vf, ef) of sparserun/runtime/cuda_ext.py.
//   x      device pointer, [M, K] with row stride ldx elements; 16-byte aligned; K % 8 == 0, ldx % 8 == 0
//   vf     device pointer, [ceil(N/128)*8, k_steps, 32, 8] elements of the weight dtype, 16-byte aligned
//   ef     device pointer, [ceil(N/128)*8, k_steps, 16] uint32, 16-byte aligned
//   bias   device pointer [N] or NULL
//   y      device pointer, [M, N] with row stride ldy elements (>= N)
//   k_steps = ceil(K4 / 32) where K4 = K rounded up to 4 (the repack's); K <= 32 * k_steps
//   dtype  0 = float16, 1 = bfloat16
//   config -1 = choose by shape, else 0..sparserun_semi24_num_configs()-1
// Returns 0 or an SR_* code (sparserun_semi24_error_string). M == 0 is a no-op. Asynchronous on `stream`.
int sparserun_semi24_gemm(const void* x, long long ldx, const void* vf, const void* ef, const void* bias,
                          void* y, long long ldy, int M, int N, int K, int k_steps, int dtype, int config,
                          cudaStream_t stream) {
  if (dtype != 0 && dtype != 1) return SR_BAD_DTYPE;
  if (M < 0 || N <= 0 || K <= 0 || K % 8 != 0 || k_steps <= 0 || (long long)k_steps * 32 < K ||
      ldx < K || ldy < N || k_steps > (1 << 24))
    return SR_BAD_SHAPE;
  if (ldx % 8 != 0 || (reinterpret_cast<uintptr_t>(x) & 15) || (reinterpret_cast<uintptr_t>(vf) & 15) ||
      (reinterpret_cast<uintptr_t>(ef) & 15) || (reinterpret_cast<uintptr_t>(y) & 1) ||
      (reinterpret_cast<uintptr_t>(bias) & 1))
    return SR_BAD_ALIGNMENT;
  if (config < -1 || config >= NUM_CONFIGS) return SR_BAD_CONFIG;
  DeviceInfo* d = nullptr;
  int rc = device_info(&d);
  if (rc != SR_OK) return rc;
  if (d->cc < 80) return SR_UNSUPPORTED_ARCH;
  if (M == 0) return SR_OK;
  Params p{x, vf, ef, bias, y, ldx, ldy, M, N, K, k_steps};
  if (config < 0) config = pick_config(M, N, d->sms);
  return dtype == 0 ? dispatch<__half>(p, *d, 0, config, stream)
                    : dispatch<__nv_bfloat16>(p, *d, 1, config, stream);
}

int sparserun_semi24_num_configs(void) { return NUM_CONFIGS; }

// The config the launcher would pick for (M, N) on the current device (-1 on error).
int sparserun_semi24_pick_config(int M, int N) {
  DeviceInfo* d = nullptr;
  if (device_info(&d) != SR_OK) return -1;
  return pick_config(M, N, d->sms);
}

const char* sparserun_semi24_error_string(int code) {
  switch (code) {
    case SR_OK: return "ok";
    case SR_BAD_SHAPE:
      return "bad shape (need M >= 0, N > 0, K > 0 with K % 8 == 0, K <= 32*k_steps, ldx >= K, ldy >= N, "
             "and at most 65535 token tiles)";
    case SR_BAD_DTYPE: return "unsupported dtype code (0 = float16, 1 = bfloat16)";
    case SR_BAD_ALIGNMENT:
      return "misaligned operand (x, vf, ef need 16-byte alignment and ldx % 8 == 0; y, bias 2-byte)";
    case SR_UNSUPPORTED_ARCH:
      return "unsupported GPU (mma.sp needs compute capability >= 8.0 and enough shared memory)";
    case SR_BAD_CONFIG: return "tile config out of range";
    case SR_LAUNCH_FAILED: return "kernel launch failed";
    case SR_CUDA_ERROR: return "CUDA runtime error while querying the device";
    default: return "unknown error code";
  }
}

// cudaGetErrorString of the last CUDA failure seen by this thread in the launcher ("no error" if none).
const char* sparserun_semi24_last_cuda_error(void) { return cudaGetErrorString(g_last_cuda_error); }

}  // extern "C"
