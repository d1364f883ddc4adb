"""Timing and result-writing helpers for GPU benchmarks.

Timing follows one rule everywhere: `triton.testing.do_bench` (CUDA events, median), after warm-up,
rotating among copies of the operands whose total size exceeds L2 several times, so a layer small enough
to sit in L2 (a 4096x4096 bf16 weight is 32 MiB; H100 L2 is 50 MB) is still timed from HBM, as it is
in a real model where every other layer's weights evict it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import _umask_mode

ROTATE_BYTES = 512 * 2**20  # total operand bytes to rotate through: ~10x the H100's L2


def n_copies(bytes_per_copy: int, budget: int = ROTATE_BYTES, lo: int = 2, hi: int = 64) -> int:
    """How many operand copies to rotate among so their total exceeds `budget`."""
    return max(lo, min(hi, math.ceil(budget / max(1, bytes_per_copy))))


def bench(fn: Callable[[int], object], copies: int, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median milliseconds of fn(i), i cycling over range(copies)."""
    import triton.testing

    state = {"i": 0}

    def step():
        i = state["i"]
        state["i"] = (i + 1) % copies
        fn(i)

    return float(triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def copy_bandwidth_gbs(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), copies=1, rep_ms=300)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3) / 1e9


def environment() -> dict:
    """What a reader needs to reproduce a number: GPU, driver-visible properties, library versions."""
    import triton

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        # the runtime settings that change what a SparseLinear runs (docs/runtime.md)
        "sparserun_env": {k: os.environ[k] for k in ("SPARSERUN_BACKEND", "SPARSERUN_BACKENDS",
                                                     "SPARSERUN_KEEP_DENSE", "SPARSERUN_NO_CUDA_BUILD",
                                                     "SPARSERUN_GROUP_SIBLINGS")
                          if k in os.environ},
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(
            gpu=p.name,
            sm_count=p.multi_processor_count,
            capability=f"{p.major}.{p.minor}",
            memory_gib=round(p.total_memory / 2**30, 1),
            l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1),
        )
    else:
        info["gpu"] = "cpu"
    return info


def gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_stem(kind: str, env: dict, out_dir: str | os.PathLike = "benchmarks/results") -> Path:
    day = env["date"][:10]
    return Path(out_dir) / f"{gpu_slug(env['gpu'])}-{day}-{kind}"


def check_out_dir(out_dir, flag: str = "--out") -> Path:
    """Create the results directory and prove it writable before a run, not after: a long GPU sweep that
    cannot save its results at the end is lost."""
    import tempfile

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OSError(f"cannot write results to {flag} {out}: it is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as f:  # a byte written and flushed: a full disk fails here
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(f"cannot write results to {flag} {out}: {e.strerror or e}") from None
    return out


def write_atomically(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: a crash never leaves a half-written results file, and a failed
    write leaves the previous file as it was. The temp name is unique (two runs writing the same day's file
    shared one and tore each other's JSON) and keeps the suffix (matplotlib picks the format from it)."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode(0o666))  # results are for sharing, as open() would have made them
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path, payload: dict) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=1, default=str)))


def markdown_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def finish_results(stem: Path, md: list, result: dict, plot) -> None:
    """Append recorded failures to the markdown lines, write the .md and the .png (a plotting error is
    printed, never lost results), and say where they went."""
    import traceback

    if result["failures"]:
        md += ["", "## Failures (recorded, not crashed)", ""]
        md += [f"- `{k}`: {v}" for k, v in sorted(result["failures"].items())]
    write_atomically(stem.with_suffix(".md"), lambda tmp: tmp.write_text("\n".join(md) + "\n"))
    try:
        write_atomically(stem.with_suffix(".png"), lambda tmp: plot(result, tmp))
    except Exception as e:
        if os.environ.get("SPARSERUN_BENCH_DEBUG"):
            traceback.print_exc()
        print(f"wrote {stem}.json/.md; the plot failed ({type(e).__name__}: {' '.join(str(e).split())[:200]})")
        return
    print(f"wrote {stem}.json/.md/.png")
