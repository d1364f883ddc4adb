"""The `sparserun` command.

Each subcommand is an `add_parser(subparsers)` function that adds its parser and sets `func=run(args) -> int`.
SUBCOMMANDS lists them in help order; an entry is the function itself or a "module:function" string, imported
only when the parser is built so heavy modules (transformers, triton) stay out of `sparserun --help` until
needed. Errors: a subcommand raises; main prints one line `error: ...` to stderr and returns non-zero
(`--debug` shows the traceback instead).
"""
from __future__ import annotations

import argparse
import functools
import importlib
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---- inspect --------------------------------------------------------------------------------------------

def inspect_summary(path, verify: bool = False) -> dict:
    """Layer records and totals of a packed checkpoint (what `sparserun inspect --json` prints)."""
    import math

    from .checkpoint import CheckpointReader, dtype_from_name

    def stored(info) -> int:
        # from the shape and dtype the reader checked against the shard headers: a manifest's own byte
        # counts are claims (a checkpoint from elsewhere could say anything)
        return math.prod(info["shape"]) * dtype_from_name(info["dtype"]).itemsize

    def layer_row(rec) -> dict:
        row = {k: rec.get(k) for k in ("name", "format", "pattern", "shape", "dtype", "block")}
        s = rec.get("sparsity")  # from the kept count, which only the data holds: shown if it can be one
        row["sparsity"] = s if isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1 else None
        row["nbytes"] = sum(stored(r.tensor_map[t]) for t in rec["tensors"].values())
        row["dense_nbytes"] = math.prod(rec["shape"]) * dtype_from_name(rec["dtype"]).itemsize
        return row

    with CheckpointReader(path, verify=verify) as r:
        m = r.manifest
        layers = [layer_row(rec) for rec in r.layers]
        dense = [{"name": n, "shape": r.tensor_map[n]["shape"], "dtype": r.tensor_map[n]["dtype"],
                  "nbytes": stored(r.tensor_map[n])} for n in r.dense_tensor_names()]
    sp_packed = sum(x["nbytes"] for x in layers)
    sp_dense = sum(x["dense_nbytes"] for x in layers)
    dense_bytes = sum(x["nbytes"] for x in dense)
    shard_bytes = sum(s["nbytes"] for s in m["shards"].values())
    totals = {
        "sparse_layers": {"count": len(layers), "nbytes": sp_packed, "dense_nbytes": sp_dense,
                          "ratio": round(sp_packed / sp_dense, 4) if sp_dense else None},
        "dense_tensors": {"count": len(dense), "nbytes": dense_bytes},
        # nbytes: the shard files (headers included); tensor_nbytes / dense_nbytes: the ratio's two sides
        "checkpoint": {"shards": len(m["shards"]), "nbytes": shard_bytes, "tensor_nbytes": sp_packed + dense_bytes,
                       "dense_nbytes": sp_dense + dense_bytes,
                       "ratio": round((sp_packed + dense_bytes) / (sp_dense + dense_bytes), 4)
                       if sp_dense + dense_bytes else None},
    }
    return {"path": str(path), "format_version": m["format_version"], "verified": verify,
            "sparserun_version": m.get("sparserun_version"), "source": m.get("source"),
            "architecture": m.get("architecture"), "layers": layers, "dense_tensors": dense,
            "aliases": m.get("aliases", {}), "totals": totals}


def _print_table(info: dict, show_dense: bool) -> None:
    print(f"{info['path']}: sparserun checkpoint (format_version {info['format_version']}, written by "
          f"sparserun {info['sparserun_version']}){', ' + info['architecture'] if info['architecture'] else ''}")
    if info["source"]:
        print(f"source: {info['source']}")
    from .runtime.experts import group_experts, group_name

    rows = [("layer", "format", "pattern", "shape", "dtype", "sparsity", "packed", "dense", "ratio")]
    # the experts of one MoE module that agree on format, pattern, shape and dtype are one line (--json lists all)
    for g in group_experts(info["layers"], lambda x: x["name"],
                           lambda x: (x["format"], x["pattern"], tuple(x["shape"]), x["dtype"])):
        x, packed, dense = g[0], sum(y["nbytes"] for y in g), sum(y["dense_nbytes"] for y in g)
        known = [y["sparsity"] for y in g if y["sparsity"] is not None]
        # one shape per group: the plain mean is exact
        sparsity = f"{100 * sum(known) / len(known):.1f}%" if len(known) == len(g) else "?"
        rows.append((group_name(g, lambda y: y["name"]), x["format"], x["pattern"], "x".join(map(str, x["shape"])),
                     x["dtype"], sparsity, _human(packed), _human(dense), f"{packed / dense:.3f}"))
    if len(rows) > 1:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            # name and text columns left-aligned, numbers right-aligned
            print("  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    else:
        print("(no sparse layers)")
    if show_dense and info["dense_tensors"]:
        print()
        w = max(len(d["name"]) for d in info["dense_tensors"])
        for d in info["dense_tensors"]:
            print(f"{d['name'].ljust(w)}  {d['dtype']:<9} {'x'.join(map(str, d['shape'])) or 'scalar':<14} "
                  f"{_human(d['nbytes']):>10}")
    t = info["totals"]
    s, d, c = t["sparse_layers"], t["dense_tensors"], t["checkpoint"]
    print()
    print(f"sparse linear layers: {s['count']}, packed {_human(s['nbytes'])} vs {_human(s['dense_nbytes'])} dense"
          + (f" ({s['ratio']:.3f}x)" if s["ratio"] is not None else ""))
    print(f"dense tensors:        {d['count']}, {_human(d['nbytes'])}"
          + (f" ({len(info['aliases'])} tied alias(es) stored once)" if info["aliases"] else ""))
    print(f"whole checkpoint:     {_human(c['nbytes'])} in {c['shards']} shard(s); tensors "
          f"{_human(c['tensor_nbytes'])} vs {_human(c['dense_nbytes'])} dense"
          + (f" ({c['ratio']:.3f}x)" if c["ratio"] is not None else ""))
    if info.get("verified"):
        print(f"verified: the sha256 of every shard ({c['shards']}) matches the manifest")


def _run_inspect(args) -> int:
    info = inspect_summary(args.dir, verify=args.verify)
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        _print_table(info, args.dense)
    return 0


def add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show the layers, formats and sizes of a packed checkpoint",
                       description="Per-layer table (name, format, pattern, shape, sparsity, packed vs dense "
                                   "bytes) and totals of a packed checkpoint directory.")
    p.add_argument("dir", help="packed checkpoint directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--dense", action="store_true", help="also list the dense (plain) tensors")
    p.add_argument("--verify", action="store_true", help="also check every shard's sha256 (reads all shards)")
    p.set_defaults(func=_run_inspect)


# ---- registry -------------------------------------------------------------------------------------------
# Add a subcommand: write `add_parser(sub)` in your module (adds the parser, sets func=run(args) -> int) and
# list it here as "sparserun.module:add_parser". Planned: convert, eval, generate, bench, demo, finetune.
SUBCOMMANDS: list = [
    add_inspect,
    "sparserun.cli:add_bench",
    "sparserun.convert:add_parser",
    "sparserun.eval:add_parser",
    "sparserun.demo:add_parser",
    "sparserun.generate:add_parser",
    "sparserun.finetune:add_parser",
    # --- other subcommands register here ---
]

# `sparserun bench` is a group: each entry adds one sub-subcommand (`bench tune`, `bench kernels`, ...) to the
# group's subparsers, same `add_parser(sub)` contract as above.
BENCH_SUBCOMMANDS: list = [
    "sparserun.bench.kernels:add_bench_kernels",
    "sparserun.runtime.tuning:add_bench_tune",
    "sparserun.bench.e2e:add_bench_e2e",
]


def add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks and backend tuning (see `sparserun bench -h`)",
                       description="Benchmarks and backend tuning.")
    bsub = p.add_subparsers(dest="bench_command", metavar="BENCH_COMMAND")
    for entry in BENCH_SUBCOMMANDS:
        _resolve(entry)(bsub)

    def _no_sub(args) -> int:
        p.print_help(sys.stderr)
        return 2
    p.set_defaults(func=_no_sub)


def seed_arg(text: str) -> int:
    """argparse type of --seed: an integer torch.manual_seed takes, checked before a model is loaded (torch's
    own check fails with "Overflow when unpacking long long" only after the load)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not -2 ** 63 <= v < 2 ** 64:
        raise argparse.ArgumentTypeError(f"{text} is outside the seeds torch takes, [-2**63, 2**64 - 1]")
    return v


def _resolve(entry):
    if callable(entry):
        return entry
    mod, _, fn = entry.partition(":")
    return getattr(importlib.import_module(mod), fn)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="sparserun",
                                     description="Prune, pack and run sparse LLMs (2:4 and block-sparse).")
    parser.add_argument("--version", action="version", version=f"sparserun {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in SUBCOMMANDS:
        _resolve(entry)(sub)
    return parser


def _one_line(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, a job scheduler) or SIGHUP (the terminal or ssh session closed), raised like
    Ctrl-C's KeyboardInterrupt: a BaseException that `except Exception` does not swallow, so the `with` blocks
    and finally clauses that remove temp directories run on the way out."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    raise Terminated(signum)


# what ends a run like Ctrl-C does (SIGHUP does not exist on Windows)
_TERMINATING = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is accepted anywhere (before or after the subcommand) without every subparser declaring it
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # Python only lets the main thread set handlers; main() called from another thread keeps the default.
    # The caller's handler comes back afterwards (main may be called from a program with its own).
    installed = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, _on_signal) for s in _TERMINATING} if installed else {}
    streams = _printable_streams()
    try:
        return _main(argv, debug)
    finally:
        for s, handler in previous.items():
            # None: the previous handler was not set from Python; SIG_DFL is what such a process starts with
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        for name, (stream, errors) in streams.items():
            if getattr(sys, name) is stream and errors is not None:
                stream.reconfigure(errors=errors)


def _printable_streams() -> dict:
    """Make stdout/stderr able to print anything: a generated word, a path or a tokenizer's text may hold
    characters a C/POSIX locale (ASCII) or a Windows code page cannot encode, and one such character killed a
    run after its work was done. Those characters are printed as backslash escapes instead. A closed stream
    (`>&-`, None in Python) becomes devnull. Returns what to restore."""
    touched = {}
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is None:
            setattr(sys, name, open(os.devnull, "w"))
            continue
        enc = (getattr(stream, "encoding", None) or "").lower().replace("-", "").replace("_", "")
        if enc and enc not in ("utf8", "utf8sig") and hasattr(stream, "reconfigure"):
            touched[name] = (stream, getattr(stream, "errors", None))
            stream.reconfigure(errors="backslashreplace")
    return touched


def _show_warning(message, category, filename, lineno, file=None, line=None, *, default):
    """sparserun's own warnings (raised in the package, or a SparserunWarning pointing at the model code that
    caused it) as one `warning: ...` line: a source path and code line say nothing to a CLI user. Other
    libraries' warnings as Python prints them."""
    from . import SparserunWarning

    if issubclass(category, SparserunWarning) or Path(filename).resolve().is_relative_to(_PACKAGE):
        print(f"warning: {str(message).removeprefix('sparserun: ')}", file=file or sys.stderr)
    else:
        default(message, category, filename, lineno, file, line)


_PACKAGE = Path(__file__).resolve().parent


def _main(argv: list, debug: bool) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = functools.partial(_show_warning, default=warnings.showwarning)
        return _run_command(argv, debug)


def _run_command(argv: list, debug: bool) -> int:
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse: --help/--version (0) or a usage error (2, message already printed)
            return e.code if isinstance(e.code, int) else 2
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return 2
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handlers below, not at interpreter exit
        return rc
    except BrokenPipeError:
        # stdout's reader went away (`sparserun inspect DIR --json | head -1`): not an error to report. Point
        # stdout at devnull so the interpreter's flush at exit does not raise again (the Python docs' recipe)
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
            pass
        return 1
    except Terminated as e:
        print("error: terminated" + (" (hangup)" if e.signum != signal.SIGTERM else ""), file=sys.stderr)
        return 128 + e.signum  # 143 for SIGTERM, what a shell reports for a process killed by it
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from .checkpoint import CheckpointError

        known = (CheckpointError, ValueError, TypeError, OSError, NotImplementedError)
        msg = _one_line(e) if isinstance(e, known) else f"{type(e).__name__}: {_one_line(e)}"
        print(f"error: {msg}{'' if isinstance(e, known) else ' (run with --debug for the traceback)'}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
