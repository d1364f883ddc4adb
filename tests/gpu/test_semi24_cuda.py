"""The CUDA mma.sp 2:4 GEMM (csrc/semi24_gemm.cu) against a float64 reference, on a GPU.

Random data (never zeros), outputs poisoned with NaN before every launch, every tile config forced in turn
plus the automatic choice, M from 1 to 8192, N and K that are not tile multiples, bias on and off.
Error metric: ||out - ref|| / ||ref||, bf16 < 1e-2, fp16 < 2e-3.
"""
import math

import pytest
import torch

from sparserun.formats import semi24
from sparserun.runtime import cuda_ext

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
M_VALUES = (1, 2, 3, 7, 16, 33, 64, 129, 1000, 2048, 8192)
CONFIGS = (-1, 0, 1, 2)
# (N, K): tile multiples, ragged N, K not a multiple of 32 / 8 / 4, a Llama shape
SHAPES = ((128, 64), (1000, 1000), (96, 40), (72, 30), (136, 100), (4096, 4096), (1024, 4096))


@pytest.fixture(scope="module")
def ext():
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        pytest.skip(f"mma.sp needs sm_80+, this GPU is {major}.{minor}")
    mod = cuda_ext.load_extension(verbose=False)
    assert mod is not None, f"CUDA extension did not build on a GPU machine: {cuda_ext.why_unavailable()}"
    return mod


def random_24(n, k, dtype, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", dtype=torch.float32, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones_like(w), w)  # never zeros: a dropped value must show
    kp = (k + 3) // 4 * 4
    keep = torch.rand(n, kp // 4, 4, device="cuda", generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, kp // 4, 4, dtype=torch.bool, device="cuda").scatter_(-1, keep, True)
    mask = mask.view(n, kp)[:, :k]
    p = semi24.pack(w, mask)
    return p, semi24.unpack(p)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), f"{int((~torch.isfinite(out)).sum())} non-finite outputs (unwritten?)"
    return float((out.double() - ref).norm() / ref.norm())


def run_out(ext, x, vf, ef, bias, n, config):
    out = torch.full((x.shape[0], n), float("nan"), dtype=x.dtype, device=x.device)
    ext.semi24_gemm(x, vf, ef, bias, n, config, out)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_reference(ext, dtype, shape, with_bias):
    n, k = shape
    p, w = random_24(n, k, dtype, seed=n * 7919 + k)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    bias = torch.randn(n, device="cuda", dtype=dtype) if with_bias else None
    wd = w.double()
    failures = []
    for m in M_VALUES:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        ref = x.double() @ wd.t()
        if bias is not None:
            ref += bias.double()
        for cfg in CONFIGS:
            if k % 8:
                out = cuda_ext.semi24_gemm_cuda(x, vf, ef, bias, n, cfg)  # the op pads K to 8
            else:
                out = run_out(ext, x, vf, ef, bias, n, cfg)
            err = rel_err(out, ref)
            if not err < TOL[dtype]:
                failures.append(f"M={m} config={cfg}: rel err {err:.3g}")
        torch.cuda.synchronize()
    assert not failures, f"{dtype} N={n} K={k} bias={with_bias}: " + "; ".join(failures)


def test_op_shapes_strides_and_dtype_errors(ext):
    n, k = 200, 256
    p, w = random_24(n, k, torch.bfloat16, seed=3)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    # 3-D input and a strided (non-contiguous rows) view
    x3 = torch.randn(2, 5, k, device="cuda", dtype=torch.bfloat16)
    y3 = cuda_ext.semi24_gemm_cuda(x3, vf, ef, None, n)
    assert y3.shape == (2, 5, n)
    assert rel_err(y3, x3.double() @ w.double().t()) < TOL[torch.bfloat16]
    big = torch.randn(9, 2 * k, device="cuda", dtype=torch.bfloat16)
    xs = big[:, :k]  # row stride 2k
    ys = cuda_ext.semi24_gemm_cuda(xs, vf, ef, None, n)
    assert rel_err(ys, xs.double() @ w.double().t()) < TOL[torch.bfloat16]
    # M = 0
    assert cuda_ext.semi24_gemm_cuda(x3[:0, 0], vf, ef, None, n).shape == (0, n)
    # errors name the values
    with pytest.raises(RuntimeError, match="float16 or bfloat16, got Float"):
        ext.semi24_gemm(torch.randn(4, k, device="cuda"), vf, ef, None, n, -1)
    with pytest.raises(RuntimeError, match="vf dtype"):
        ext.semi24_gemm(torch.randn(4, k, device="cuda", dtype=torch.float16), vf, ef, None, n, -1)
    with pytest.raises(RuntimeError, match="N=300"):
        ext.semi24_gemm(x3[0], vf, ef, None, 300, -1)
    with pytest.raises(RuntimeError, match="covers only"):
        ext.semi24_gemm(torch.randn(4, 2 * k, device="cuda", dtype=torch.bfloat16), vf, ef, None, n, -1)
    with pytest.raises(RuntimeError, match="config=7"):
        ext.semi24_gemm(x3[0], vf, ef, None, n, 7)
    with pytest.raises(RuntimeError, match="bias"):
        ext.semi24_gemm(x3[0], vf, ef, torch.randn(n + 1, device="cuda", dtype=torch.bfloat16), n, -1)
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        ext.semi24_gemm(x3[0].cpu(), vf, ef, None, n, -1)


def test_runs_on_the_current_stream_and_in_a_cuda_graph(ext):
    n, k = 512, 512
    p, w = random_24(n, k, torch.float16, seed=5)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    bias = torch.randn(n, device="cuda", dtype=torch.float16)
    x = torch.randn(33, k, device="cuda", dtype=torch.float16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up on the side stream, as CUDA graphs require
            y = cuda_ext.semi24_gemm_cuda(x, vf, ef, bias, n)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=s):
            y = cuda_ext.semi24_gemm_cuda(x, vf, ef, bias, n)
    torch.cuda.current_stream().wait_stream(s)
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = x.double() @ w.double().t() + bias.double()
    assert rel_err(y, ref) < TOL[torch.float16]


def test_torch_compile_fullgraph(ext):
    n, k = 256, 128
    p, w = random_24(n, k, torch.bfloat16, seed=9)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)

    @torch.compile(fullgraph=True)
    def f(x):
        return torch.relu(cuda_ext.semi24_gemm_cuda(x, vf, ef, None, n)) * 2

    x = torch.randn(17, k, device="cuda", dtype=torch.bfloat16)
    ref = torch.relu(x.double() @ w.double().t()) * 2
    assert rel_err(f(x), ref) < TOL[torch.bfloat16]


def test_sparse_linear_backends_agree(monkeypatch, ext):
    """SparseLinear through each 2:4 GPU backend matches the reference backend."""
    from sparserun.runtime.linear import SparseLinear

    n, k = 384, 640
    p, w = random_24(n, k, torch.bfloat16, seed=11)
    layer = SparseLinear.from_packed(p, torch.randn(n, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(3, 21, k, device="cuda", dtype=torch.bfloat16)
    monkeypatch.setenv("SPARSERUN_BACKEND", "reference")
    ref = layer(x).double()
    for backend in ("cuda", "cusparselt", "dense", "auto"):
        monkeypatch.setenv("SPARSERUN_BACKEND", backend)
        try:
            out = layer(x)
        except RuntimeError as e:
            if backend == "cusparselt" and "unavailable" in str(e):
                continue  # this torch build has no cuSPARSELt
            raise
        assert out.shape == (3, 21, n)
        err = float((out.double() - ref).norm() / ref.norm())
        assert err < TOL[torch.bfloat16], f"backend {backend}: rel err {err:.3g}"


def test_pick_config_is_sane(ext):
    assert ext.num_configs() == cuda_ext.NUM_CONFIGS
    assert ext.pick_config(1, 4096) == 0
    assert ext.pick_config(8192, 4096) == 2
    assert ext.pick_config(64, 1024) in (0, 1, 2)
    assert math.isfinite(float(ext.pick_config(100000, 128)))
