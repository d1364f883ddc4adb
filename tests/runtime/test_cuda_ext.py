"""The CUDA kernel's Python side on CPU: the load-time repack against an independent emulation of the
mma.sp fragment/metadata rules, the build's skip and failure paths, and the op's fake implementation."""
import warnings

import pytest
import torch

from sparserun.formats import semi24
from sparserun.runtime import cuda_ext


def packed(n, k, dtype=torch.float16, seed=0, fewer=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    w = torch.where(w == 0, torch.ones_like(w), w)
    kp = (k + 3) // 4 * 4
    keep = torch.rand(n, kp // 4, 4, generator=g).argsort(-1)[..., :2]
    mask = torch.zeros(n, kp // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
    if fewer:  # some groups keep one weight or none: the format fills in ordered positions
        mask &= torch.rand(n, kp // 4, 1, generator=g) > 0.3
    return semi24.pack(w, mask.view(n, kp)[:, :k])


SHAPES = [(16, 32), (1, 4), (130, 100), (257, 36), (64, 30), (200, 1000), (128, 4096), (17, 9)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_repack_is_what_mma_sp_reads(n, k, dtype):
    p = packed(n, k, dtype, seed=n * 31 + k, fewer=(n % 2 == 0))
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    np_, ks = cuda_ext.padded_sizes(n, k)
    assert vf.shape == (np_ // 16, ks, 32, 8) and vf.dtype == dtype and vf.is_contiguous()
    assert ef.shape == (np_ // 16, ks, 16) and ef.dtype == torch.int32 and ef.is_contiguous()
    assert np_ % 128 == 0 and ks * 32 >= k
    dense = cuda_ext.emulate_dense(vf, ef, n, k)
    ref = semi24.unpack(p).to(torch.float64)
    assert torch.equal(dense, ref)  # bit-exact (values are only moved)
    # and as a GEMM: x · Wᵀ through the emulated operand equals the reference
    x = torch.randn(3, k, dtype=torch.float64)
    torch.testing.assert_close(x @ dense.t(), x @ ref.t())


def test_repack_padding_is_valid_metadata_and_zero_values():
    n, k = 20, 40  # 108 padding rows, and 24 padding columns in the last k-step
    p = packed(n, k)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], n, k)
    full = cuda_ext.emulate_dense(vf, ef, vf.shape[0] * 16, vf.shape[1] * 32)  # raises on bad nibbles
    assert full[n:].abs().sum() == 0 and full[:, k:].abs().sum() == 0
    pad_word = 0x4444 | (0x4444 << 16)  # every nibble = positions (0, 1)
    assert bool(((ef[2:].to(torch.int64) & 0xFFFFFFFF) == pad_word).all())


def test_emulation_rejects_invalid_metadata():
    p = packed(16, 32)
    vf, ef = cuda_ext.repack(p.tensors["values"], p.tensors["meta"], 16, 32)
    with pytest.raises(ValueError, match="invalid metadata nibble"):
        cuda_ext.emulate_dense(vf, torch.zeros_like(ef), 16, 32)  # 0b0000: both indices 0


def test_repack_checks_shapes():
    p = packed(16, 32)
    v, m = p.tensors["values"], p.tensors["meta"]
    with pytest.raises(ValueError, match=r"values shape \(16, 16\), expected \(16, 18\)"):
        cuda_ext.repack(v, m, 16, 36)
    with pytest.raises(ValueError, match="meta must be uint8"):
        cuda_ext.repack(v, m.to(torch.int32), 16, 32)


def test_no_build_without_cuda_or_when_disabled(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_tried", False)
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setenv("SPARSERUN_NO_CUDA_BUILD", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a deliberate skip is not worth a warning
        assert cuda_ext.load_extension() is None
    assert cuda_ext.why_unavailable() == "SPARSERUN_NO_CUDA_BUILD is set"
    monkeypatch.delenv("SPARSERUN_NO_CUDA_BUILD")
    if not torch.cuda.is_available():
        assert cuda_ext.skip_reason() in ("this torch has no CUDA support", "no CUDA device")


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    calls = []

    def broken_load(**kw):
        calls.append(kw)
        raise RuntimeError("Error building extension 'x'\nnvcc fatal : Unsupported gpu architecture")

    monkeypatch.setattr(cuda_ext, "_tried", False)
    monkeypatch.setattr(cuda_ext, "_ext", None)
    monkeypatch.setattr(cuda_ext, "skip_reason", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(cpp, "load", broken_load)
    monkeypatch.setenv("SPARSERUN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    with pytest.warns(RuntimeWarning, match="Unsupported gpu architecture") as rec:
        assert cuda_ext.load_extension() is None
        assert cuda_ext.load_extension() is None  # no second build, no second warning
    assert len(rec) == 1 and len(calls) == 1
    assert calls[0]["build_directory"].startswith(str(tmp_path / "cuda_ext" / "torch"))
    assert "sm90" in calls[0]["build_directory"]
    import os
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "7.0"  # restored
    with pytest.raises(RuntimeError, match="kernel unavailable: build failed"):
        cuda_ext.semi24_gemm_cuda(torch.randn(2, 32, dtype=torch.float16), torch.zeros(8, 1, 32, 8),
                                  torch.zeros(8, 1, 16, dtype=torch.int32), None, 16)


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARSERUN_CACHE_DIR", str(tmp_path / "c"))
    assert cuda_ext.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SPARSERUN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cuda_ext.cache_dir() == tmp_path / "x" / "sparserun"


def test_custom_op_has_a_fake_impl():
    from torch._subclasses.fake_tensor import FakeTensorMode

    assert hasattr(torch.ops.sparserun, "semi24_gemm_cuda")
    with FakeTensorMode():
        x = torch.empty(2, 7, 64, dtype=torch.bfloat16)
        vf = torch.empty(8, 2, 32, 8, dtype=torch.bfloat16)
        ef = torch.empty(8, 2, 16, dtype=torch.int32)
        y = torch.ops.sparserun.semi24_gemm_cuda(x, vf, ef, None, 100, -1)
        assert y.shape == (2, 7, 100) and y.dtype == torch.bfloat16
