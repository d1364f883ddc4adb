"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) on this machine, which has no GPU: the CPU
interpreter accepts code the GPU compiler rejects, and a decode kernel's cost is its instruction stream, which
the compiled SASS shows exactly (sparserun/bench/offline.py). Runs in a subprocess: the test session's
TRITON_INTERPRET=1 turns every kernel into an interpreted function."""
import json
import os
import subprocess
import sys

import pytest

from sparserun.bench import offline

pytestmark = pytest.mark.skipif(offline.available() is not None, reason=str(offline.available()))


def _sweep(*args) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "sparserun.bench.offline", "--json", *args], env=env,
                       capture_output=True, text=True, timeout=900)
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert rows, f"no output (exit {r.returncode}): {r.stderr[-2000:]}"
    return rows


@pytest.fixture(scope="module")
def sm90_rows():
    return _sweep("--arch", "90", "--quick", "--m", "1,4,16,128", "--blocks", "32,64", "--n", "1024", "--k", "1024")


def test_every_kernel_family_compiles_for_sm90(sm90_rows):
    failed = [f"{r['config']} (M={r['M']}): {r['error']}" for r in sm90_rows if not r["ok"]]
    assert not failed, "\n".join(failed)
    kinds = {r["kernel"] for r in sm90_rows}
    assert {"_semi24_gemv_units_kernel", "_semi24_gemv_kernel", "_semi24_matmul_kernel", "_semi24_dot_words_kernel",
            "_splitk_reduce_kernel", "_bsr_matmul_kernel", "_semi24_unpack_kernel", "_semi24_unpack_words_kernel",
            "_bsr_unpack_kernel"} <= kinds


def test_no_candidate_config_spills():
    """Every tuning candidate of both kernels at decode and prefill sizes fits in registers on sm_90 (spills
    turned half of the old 2:4 prefill tiles into local-memory traffic)."""
    rows = _sweep("--arch", "90", "--m", "1,16,512", "--blocks", "32,128", "--n", "1024", "--k", "1024")
    spills = [f"{r['config']} (M={r['M']}): {r['spill_bytes']} bytes" for r in rows if r["ok"] and r["spill_bytes"]]
    assert not spills, "\n".join(spills)


def test_fp32_block_configs_do_not_spill():
    """fp32 dots are exact ("ieee") and hold twice the registers: the 64-row B = 128 tiles spilled ~15 KB."""
    rows = _sweep("--arch", "90", "--dtype", "float32", "--m", "64,512", "--blocks", "128", "--n", "1024",
                  "--k", "1024")
    rows = [r for r in rows if r["kernel"] == "_bsr_matmul_kernel"]
    assert rows
    spills = [f"{r['config']} (M={r['M']}): {r['spill_bytes']} bytes" for r in rows if r["ok"] and r["spill_bytes"]]
    assert not spills, "\n".join(spills)


def test_unit_gemv_hot_loop_stays_in_registers_and_lean(sm90_rows):
    """The property the unit GEMV was built for (NOTES.md): no shared-memory shuffle in its loop and under 20
    instructions per group of 4 weights at one token (the 2-D GEMV takes 33-35)."""
    rows = [r for r in sm90_rows if r["kernel"] == "_semi24_gemv_units_kernel"]
    assert rows
    for r in rows:
        assert not r["loop_uses_shared_memory"], r["config"]
        if r["M"] == 1:
            assert r["instructions_per_group_token"] < 20, r


def test_compiles_for_sm80_fp16():
    rows = _sweep("--arch", "80", "--dtype", "float16", "--quick", "--m", "1,128", "--blocks", "64",
                  "--n", "1024", "--k", "1024")
    failed = [f"{r['config']} (M={r['M']}): {r['error']}" for r in rows if not r["ok"]]
    assert not failed, "\n".join(failed)
