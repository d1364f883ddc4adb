"""Compile the Triton kernels a launch would run for an NVIDIA GPU on a machine without one, and read the SASS.

Why: a kernel that the CPU interpreter accepts can still fail to compile for the GPU, and a decode kernel's
speed is often decided by how many instructions it issues per byte of weight, which the SASS shows exactly.
Both can be checked before a GPU is at hand (tests/kernels/test_compile_sm90.py; `python -m
sparserun.bench.offline` prints the table; benchmarks/offline_compat.sh does it with another Triton version).
Run it in a process without TRITON_INTERPRET: under the interpreter the kernels are not compilable objects.

    with record_launches(semi24_matmul_module) as launches:
        semi24_matmul(x_cpu, values, meta, k, config=cfg)       # nothing runs: launches are recorded
    for launch in launches:
        compiled = compile_offline(launch, arch=90)              # ptxas from the Triton wheel, no driver
        print(hot_loop(compiled))                                # SASS opcodes of the hottest loop

Arguments are specialised as Triton's JIT would at launch (16-byte aligned pointers and multiples of 16 get
the divisibility attribute, ints equal to 1 become constants), so the code is the code a GPU would run.
"""
from __future__ import annotations

import collections
import contextlib
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field


@dataclass
class Launch:
    """One recorded `kernel[grid](*args, **kwargs)`."""

    fn: object  # the @triton.jit function
    grid: tuple
    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.fn.__name__


class _Recorder:
    def __init__(self, fn, sink: list):
        self.fn, self.sink = fn, sink

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.sink.append(Launch(self.fn, tuple(grid) if not callable(grid) else grid, args, dict(kwargs)))
        return record


@contextlib.contextmanager
def record_launches(*modules):
    """Within the block, every @triton.jit kernel defined at module level in `modules` records its launches
    instead of running (the launcher's Python still runs: shape checks, views, config choice)."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    saved = []
    for mod in modules:
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, JITFunction):
                saved.append((mod, name, obj))
                setattr(mod, name, _Recorder(obj, launches))
    try:
        yield launches
    finally:
        for mod, name, obj in saved:
            setattr(mod, name, obj)


_TORCH_TO_TRITON = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64", "int8": "i8",
                    "int16": "i16", "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "i1"}


def _specialise_value(v, align: bool):
    """(type, spec) as Triton's JIT specialises a launch argument; Triton's own routine where it has one."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend

        return native_specialize_impl(BaseBackend, v, False, True, align)
    except ImportError:  # older Triton: the same rules, written out
        pass
    if v is None:
        return "constexpr", None
    if isinstance(v, bool):
        return "u1", None
    if isinstance(v, int):
        if v == 1:
            return "constexpr", 1
        ty = "i32" if -2**31 <= v < 2**31 else "i64"
        return ty, "D" if align and v % 16 == 0 else ""
    if isinstance(v, float):
        return "fp32", None
    if hasattr(v, "data_ptr"):
        return "*" + _TORCH_TO_TRITON[str(v.dtype).replace("torch.", "")], \
            "D" if align and v.data_ptr() % 16 == 0 else ""
    raise TypeError(f"cannot specialise a launch argument of type {type(v).__name__}")


def _specialise(launch: Launch):
    fn = launch.fn
    values = dict(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k in fn.arg_names})
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        if p.name not in values:
            if p.has_default:
                values[p.name] = p.default
            else:
                raise TypeError(f"{fn.__name__}: no value for argument {p.name!r} in the recorded launch")
        v = values[p.name]
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", v
            continue
        if getattr(p, "do_not_specialize", False):
            raise NotImplementedError(f"{fn.__name__}.{p.name}: do_not_specialize arguments are not modelled")
        ty, spec = _specialise_value(v, not getattr(p, "do_not_specialize_on_alignment", False))
        if ty == "constexpr":
            signature[p.name], constexprs[p.name] = "constexpr", spec
        else:
            signature[p.name] = ty
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_offline(launch: Launch, arch: int = 90):
    """Compile one recorded launch for sm_<arch> (80: Ampere, 90: Hopper). Returns Triton's compiled kernel
    (its .asm has "ttgir", "ptx", "cubin")."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("compile_offline: TRITON_INTERPRET is set, so the kernels were built as interpreted "
                           "functions; run in a process without it (python -m sparserun.bench.offline)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialise(launch)
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    src = ASTSource(fn=launch.fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def sass(compiled) -> list[str]:
    """The SASS listing of a compiled kernel (nvdisasm from the Triton wheel)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True)
    finally:
        os.unlink(f.name)
    return out.stdout.splitlines()


_LABEL = re.compile(r"^(\.L_x_\d+):")
_BACK = re.compile(r"BRA\s+`\((\.L_x_\d+)\)")
_OP = re.compile(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9_]+)")


def hot_loop(compiled) -> collections.Counter:
    """Opcode counts of the largest loop body (label to backward branch) in the SASS: the per-iteration
    instruction cost of a streaming kernel's main loop. Empty when the kernel has no loop."""
    lines = sass(compiled)
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    best = collections.Counter()
    for i, line in enumerate(lines):
        m = _BACK.search(line)
        if m and labels.get(m.group(1), i + 1) < i:
            c = collections.Counter(op.group(1) for op in map(_OP.match, lines[labels[m.group(1)]:i + 1]) if op)
            if sum(c.values()) > sum(best.values()):
                best = c
    return best


def registers(compiled) -> tuple[int, int]:
    """(registers per thread, stack bytes per thread: spills) from cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    finally:
        os.unlink(f.name)
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def available() -> str | None:
    """None when offline compilation can run here, else why not."""
    try:
        import triton  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
    except Exception as e:  # pragma: no cover - triton is a dependency
        return f"triton unavailable: {e}"
    for t in ("ptxas", "nvdisasm", "cuobjdump"):
        if not os.access(_tool(t), os.X_OK):
            return f"this Triton wheel has no {t} ({_tool(t)})"
    return None


# ---- the sweep: every candidate config of the decode and prefill kernels ------------------------------------
SMEM_OPS = ("LDS", "STS", "BAR", "LDSM", "STSM")


def _work_per_thread(cfg: dict, m: int) -> float | None:
    """Weight groups of 4 (2:4) per thread in one loop iteration, per token for the CUDA-core GEMVs (each
    token costs its own FMAs) and per tile for tensor-core dots (one expansion serves all the tile's tokens)."""
    threads = 32 * cfg["num_warps"]
    if cfg.get("UNITS"):
        return cfg["BLOCK_N"] * cfg["BLOCK_U"] * 2 / threads * m
    if cfg.get("GEMV"):
        return cfg["BLOCK_N"] * cfg["BLOCK_K"] / 4 / threads * m
    if cfg.get("WORDS") or cfg.get("USE_DOT"):
        return cfg["BLOCK_N"] * cfg["BLOCK_K"] / 4 / threads  # per group: a dot tile serves all its tokens
    return None


def sweep(n: int = 4096, k: int = 4096, dtype: str = "bfloat16", arch: int = 90, ms=(1, 4, 16, 128),
          blocks=(16, 32, 64, 128), density: float = 0.3, quick: bool = False):
    """Yield one dict per (kernel config, M): compiled or the error, and for decode configs the hot loop's
    instruction count per weight group of 4 and token. `quick`: the first config of each kernel family only."""
    import torch

    from .. import formats
    from ..kernels import bsr_matmul as bsr_mod
    from ..kernels import semi24_matmul as s24_mod
    from .kernels import random_block_mask, random_mask_24

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(dt)
    p24 = formats.pack(w, random_mask_24(n, k, "cpu"), "2:4")

    def run(label, mod, call, cfg, m, per_thread):
        with record_launches(mod) as launches:
            call()
        for i, launch in enumerate(launches):
            row = {"kernel": launch.name, "config": label, "M": m, "arch": arch, "dtype": dtype}
            try:
                c = compile_offline(launch, arch)
            except Exception as e:  # report, do not stop the sweep
                row.update(ok=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                yield row
                continue
            loop = hot_loop(c)
            regs, stack = registers(c)
            row.update(ok=True, regs=regs, spill_bytes=stack, loop_instructions=sum(loop.values()),
                       loop_uses_shared_memory=any(loop[o] for o in SMEM_OPS))
            if i == 0 and per_thread:
                row["instructions_per_group_token"] = round(sum(loop.values()) / per_thread, 2)
            yield row

    from ..kernels import bsr_unpack as bsr_unpack_mod
    from ..kernels import semi24_unpack as s24_unpack_mod

    # the dense fallback's decompression kernels (no M): whole words, and the 16-bit path of a padded K
    yield from run("semi24 unpack", s24_unpack_mod,
                   lambda: s24_unpack_mod.semi24_unpack(p24.tensors["values"], p24.tensors["meta"], k), {}, 0, None)
    p_odd = formats.pack(w[:, :k - 2], random_mask_24(n, k, "cpu")[:, :k - 2], "2:4")
    yield from run("semi24 unpack, padded K", s24_unpack_mod,
                   lambda: s24_unpack_mod.semi24_unpack(p_odd.tensors["values"], p_odd.tensors["meta"], k - 2), {},
                   0, None)
    for b in blocks:
        pb = formats.pack(w, random_block_mask(n, k, b, density, "cpu"), f"{b}x{b}").tensors
        yield from run(f"bsr B={b} unpack", bsr_unpack_mod,
                       lambda: bsr_unpack_mod.bsr_unpack(pb["crow_indices"], pb["col_indices"], pb["values"], k),
                       {}, 0, None)
    for m in ms:
        x = torch.randn(m, k, generator=gen).to(dt)
        seen = set()
        for cfg in s24_mod.candidate_configs(m, n, k, 132, dt):
            fam = ("units" if cfg.get("UNITS") else "gemv" if cfg.get("GEMV") else
                   "words" if cfg.get("WORDS") else "dot")
            if quick and fam in seen:
                continue
            seen.add(fam)
            label = f"semi24 {fam} " + " ".join(f"{a}={b}" for a, b in cfg.items())
            yield from run(label, s24_mod, lambda: s24_mod.semi24_matmul(x, p24.tensors["values"],
                                                                        p24.tensors["meta"], k, config=cfg),
                           cfg, m, _work_per_thread(cfg, m))
        for b in blocks:
            pb = formats.pack(w, random_block_mask(n, k, b, density, "cpu"), f"{b}x{b}")
            crow, col, vals = pb.tensors["crow_indices"], pb.tensors["col_indices"], pb.tensors["values"]
            most = int((crow[1:] - crow[:-1]).max())
            seen = set()
            for cfg in bsr_mod.candidate_configs(m, b, dt):
                fam = "dot" if cfg.get("USE_DOT") else "fma"
                if quick and fam in seen:
                    continue
                seen.add(fam)
                label = f"bsr B={b} {fam} " + " ".join(f"{a}={v}" for a, v in cfg.items())
                yield from run(label, bsr_mod, lambda: bsr_mod.bsr_matmul(x, crow, col, vals, most, config=cfg),
                               cfg, m, None)


def main(argv=None) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(description="Compile sparserun's Triton kernels for an NVIDIA arch without a "
                                             "GPU; report failures, registers, spills and hot-loop SASS.")
    ap.add_argument("--arch", type=int, default=90, help="80 (A100) or 90 (H100)")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--m", default="1,4,16,128", help="token counts (comma separated)")
    ap.add_argument("--blocks", default="16,32,64,128")
    ap.add_argument("--quick", action="store_true", help="one config per kernel family")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    a = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # this process compiles; it never runs a kernel
    why = available()
    if why:
        print(why)
        return 2
    bad = 0
    if not a.json:
        print(f"sm_{a.arch}, {a.dtype}, N={a.n} K={a.k}")
        print(f"{'M':>4} {'kernel':<28} {'regs':>4} {'spill':>5} {'loop':>5} {'/group':>6} {'smem':>4}  config")
    for row in sweep(a.n, a.k, a.dtype, a.arch, tuple(int(v) for v in a.m.split(",")),
                     tuple(int(v) for v in a.blocks.split(",")), quick=a.quick):
        bad += not row["ok"]
        if a.json:
            print(json.dumps(row), flush=True)
        elif not row["ok"]:
            print(f"{row['M']:>4} {row['kernel']:<28} FAILED {row['error']}  {row['config']}")
        else:
            per = row.get("instructions_per_group_token")
            print(f"{row['M']:>4} {row['kernel']:<28} {row['regs']:>4} {row['spill_bytes']:>5} "
                  f"{row['loop_instructions']:>5} {per if per is not None else '':>6} "
                  f"{'yes' if row['loop_uses_shared_memory'] else 'no':>4}  {row['config']}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
