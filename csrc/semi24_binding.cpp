// Thin torch binding for the 2:4 mma.sp GEMM in semi24_gemm.cu (Marlin style): take the sizes from the
// tensors, check device / dtype / contiguity / shape / alignment, raise naming the offending values, and
// launch on the current stream. Built just-in-time by sparserun/runtime/cuda_ext.py; the torch custom op
// `sparserun::semi24_gemm_cuda` that wraps it (torch.compile / CUDA graphs) lives there too.
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>  // at::cuda::getCurrentCUDAStream is this c10 function re-exported
#include <c10/cuda/CUDAGuard.h>

#include <cuda_runtime.h>

extern "C" {
int sparserun_semi24_gemm(const void* x, long long ldx, const void* vf, const void* ef, const void* bias,
                          void* y, long long ldy, int M, int N, int K, int k_steps, int dtype, int config,
                          cudaStream_t stream);
int sparserun_semi24_num_configs(void);
int sparserun_semi24_pick_config(int M, int N);
const char* sparserun_semi24_error_string(int code);
const char* sparserun_semi24_last_cuda_error(void);
}

namespace {

// Error messages are assembled here with std::to_string and handed to TORCH_CHECK as one C string: streaming
// an integer into TORCH_CHECK's ostream from this extension segfaulted on the GPU machine (nvcc's host
// compiler /opt/gcc vs. torch's libstdc++: the crash was in std::ostream::_M_insert<long> resolved inside
// the extension, seen on an H100 2026-11-22); C strings alone were fine.
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(int64_t v) { return std::to_string(v); }
inline std::string piece(int v) { return std::to_string(v); }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string s = "[";
  for (size_t i = 0; i < a.size(); ++i) s += (i ? ", " : "") + std::to_string(a[i]);
  return s + "]";
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string s = "semi24_gemm_cuda: ";
  ((s += piece(args)), ...);
  return s;
}
#define SR_CHECK(cond, ...)                        \
  do {                                             \
    if (!(cond)) {                                 \
      const std::string sr_msg_ = cat(__VA_ARGS__); \
      TORCH_CHECK(false, sr_msg_.c_str());         \
    }                                              \
  } while (0)

bool aligned16(const at::Tensor& t) { return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15) == 0; }

// x [M, K] (row stride % 8 == 0, unit column stride), vf [Np/16, KS, 32, 8], ef [Np/16, KS, 16] int32,
// bias [N] or None -> y [M, N] in x's dtype. config: -1 = by shape, else a tile config index. `out`, if
// given, receives y (tests poison it first to prove every element is written).
at::Tensor semi24_gemm(const at::Tensor& x, const at::Tensor& vf, const at::Tensor& ef,
                       const c10::optional<at::Tensor>& bias, int64_t n, int64_t config,
                       const c10::optional<at::Tensor>& out) {
  SR_CHECK(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  SR_CHECK(vf.device() == x.device() && ef.device() == x.device(), "x, vf, ef must be on one device; got ",
           x.device(), ", ", vf.device(), ", ", ef.device());
  SR_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16,
           "x dtype must be float16 or bfloat16, got ", x.scalar_type());
  SR_CHECK(vf.scalar_type() == x.scalar_type(), "vf dtype ", vf.scalar_type(), " != x dtype ",
           x.scalar_type());
  SR_CHECK(ef.scalar_type() == at::kInt, "ef must be int32, got ", ef.scalar_type());
  SR_CHECK(x.dim() == 2, "x must be 2-D [M, K], got shape ", x.sizes());
  SR_CHECK(vf.dim() == 4 && vf.size(2) == 32 && vf.size(3) == 8, "vf must be [Np/16, KS, 32, 8], got ",
           vf.sizes());
  SR_CHECK(ef.dim() == 3 && ef.size(0) == vf.size(0) && ef.size(1) == vf.size(1) && ef.size(2) == 16,
           "ef must be [", vf.size(0), ", ", vf.size(1), ", 16] to match vf ", vf.sizes(), ", got ",
           ef.sizes());
  SR_CHECK(vf.is_contiguous() && ef.is_contiguous(), "vf and ef must be contiguous");
  const int64_t M = x.size(0), K = x.size(1), k_steps = vf.size(1);
  SR_CHECK(n > 0 && (n + 127) / 128 * 8 == vf.size(0), "N=", n, " does not match vf rows ", vf.size(0),
           " (expected ceil(N/128)*8 = ", (n + 127) / 128 * 8, ")");
  SR_CHECK(K > 0 && K % 8 == 0, "K=", K, " must be a positive multiple of 8 (pad x)");
  SR_CHECK(K <= 32 * k_steps, "x has K=", K, " columns but the weight covers only ", 32 * k_steps);
  SR_CHECK(x.stride(1) == 1 && x.stride(0) >= K && x.stride(0) % 8 == 0,
           "x must have unit column stride and a row stride that is a multiple of 8 and >= K; got strides ",
           x.strides(), " for shape ", x.sizes());
  SR_CHECK(aligned16(x) && aligned16(vf) && aligned16(ef), "x, vf, ef must be 16-byte aligned");
  SR_CHECK(M <= INT32_MAX && n <= INT32_MAX && K <= INT32_MAX, "sizes exceed int32: M=", M, " N=", n,
           " K=", K);
  SR_CHECK(config >= -1 && config < sparserun_semi24_num_configs(), "config=", config, " not in [-1, ",
           sparserun_semi24_num_configs(), ")");
  const void* bias_ptr = nullptr;
  if (bias.has_value() && bias->defined()) {
    const at::Tensor& b = *bias;
    SR_CHECK(b.device() == x.device() && b.scalar_type() == x.scalar_type() && b.dim() == 1 &&
                 b.size(0) == n && b.is_contiguous(),
             "bias must be a contiguous [", n, "] ", x.scalar_type(), " tensor on ", x.device(), "; got ",
             b.scalar_type(), " ", b.sizes(), " on ", b.device());
    bias_ptr = b.data_ptr();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y;
  if (out.has_value() && out->defined()) {
    y = *out;
    SR_CHECK(y.device() == x.device() && y.scalar_type() == x.scalar_type() && y.dim() == 2 &&
                 y.size(0) == M && y.size(1) == n && y.stride(1) == 1 && y.stride(0) >= n,
             "out must be a [", M, ", ", n, "] ", x.scalar_type(), " tensor on ", x.device(),
             " with unit column stride; got ", y.scalar_type(), " ", y.sizes(), " strides ", y.strides(),
             " on ", y.device());
  } else {
    y = at::empty({M, n}, x.options());
  }
  if (M == 0) return y;
  const int dtype = x.scalar_type() == at::kHalf ? 0 : 1;
  const int rc = sparserun_semi24_gemm(x.data_ptr(), x.stride(0), vf.data_ptr(), ef.data_ptr(), bias_ptr,
                                       y.data_ptr(), y.stride(0), (int)M, (int)n, (int)K, (int)k_steps,
                                       dtype, (int)config, c10::cuda::getCurrentCUDAStream().stream());
  SR_CHECK(rc == 0, sparserun_semi24_error_string(rc), " (code ", rc, "; M=", M, " N=", n, " K=", K,
           " k_steps=", k_steps, " dtype=", x.scalar_type(), " config=", config,
           "; last CUDA error: ", sparserun_semi24_last_cuda_error(), ")");
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("semi24_gemm", &semi24_gemm, "y = x Wᵀ + bias with W 2:4 (repacked vf, ef); mma.sp",
        py::arg("x"), py::arg("vf"), py::arg("ef"), py::arg("bias"), py::arg("n"), py::arg("config") = -1,
        py::arg("out") = py::none());
  m.def("num_configs", &sparserun_semi24_num_configs);
  m.def("pick_config", &sparserun_semi24_pick_config, py::arg("m"), py::arg("n"));
}
