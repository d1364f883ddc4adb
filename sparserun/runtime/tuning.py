"""The measured backend choice: time every candidate once per key, keep the fastest, remember it on disk.

A key is a dict naming what decides speed: format, N, K, M bucket (next power of two of the token count),
dtype, GPU name and the software versions (sparserun, torch, triton, CUDA, this cache's schema), plus
format details for block-sparse layers. For a new key every candidate runs once (warm-up, compilation,
first-use repacking), then is timed on the GPU alone (`graph_timer`: replayed from a CUDA graph with L2
flushed before each call, because decode is served from graphs and host launch cost must not decide); the
fastest wins, except that a sparse candidate must beat dense by more
than `margin` (2 %): dense wins ties, so a sparse path slower than dense is never chosen.

Choices persist in one JSON file (`tuning-v{SCHEMA}.json` under $SPARSERUN_CACHE_DIR, else
$XDG_CACHE_HOME/sparserun or ~/.cache/sparserun): read-merge-write under an exclusive fcntl lock on a side
file, written to a temp file and os.replace'd, so concurrent processes never lose each other's entries or see
half a file. A corrupt or unreadable file is treated as empty (the keys are re-tuned and the file rewritten),
never a crash.

Timing cannot run inside CUDA-graph capture or torch.compile tracing: `Tuner.lookup` gives the cached
choice there (or None, and the caller applies a static rule).
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from pathlib import Path

from .. import _umask_mode
from typing import Callable, Iterable

log = logging.getLogger(__name__)

SCHEMA = 2  # 2: GPU-only graph timing (schema 1 entries were host-bound at small M)
DENSE = "dense"
DEFAULT_MARGIN = 0.02
M_BUCKETS = tuple(2**i for i in range(14))  # 1 .. 8192


def m_bucket(m: int) -> int:
    """Next power of two >= m (1 for m <= 1)."""
    return 1 if m <= 1 else 1 << (int(m) - 1).bit_length()


def key_string(key: dict) -> str:
    return json.dumps(key, sort_keys=True, separators=(",", ":"), default=str)


def default_cache_path() -> Path:
    from .cuda_ext import cache_dir

    return cache_dir() / f"tuning-v{SCHEMA}.json"


def do_bench_timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of fn() by triton's do_bench (CUDA events, L2 flushed per run), after warm-up.

    Host launch cost is inside this number whenever it exceeds the L2 flush (~0.1 ms): at decode sizes it
    measures Python, not the GPU. Fallback only; `graph_timer` is the default."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def _flush_buffer(device) -> "torch.Tensor":
    """2x L2 of int32: writing it evicts every weight line the previous call left in L2. Allocated per
    timing and dropped after, so no tuning scratch stays in the model's memory."""
    import torch

    idx = torch.device(device).index
    idx = torch.cuda.current_device() if idx is None else idx
    l2 = getattr(torch.cuda.get_device_properties(idx), "L2_cache_size", 0) or 50 * 2**20
    return torch.empty(2 * l2 // 4, dtype=torch.int32, device=f"cuda:{idx}")


def graph_replay_ms(body: Callable[[], None], calls: int, replays: int) -> float:
    """Median ms per call of `calls` body() calls captured in one CUDA graph (body warmed up already)."""
    import statistics

    import torch

    g = torch.cuda.CUDAGraph()
    # thread_local: the first call of a shape tunes, maybe while other threads serve the same model; the
    # default ("global") mode would make their allocations fail for the length of this capture
    with torch.cuda.graph(g, capture_error_mode="thread_local"):
        for _ in range(calls):
            body()
    g.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    del g
    return statistics.median(times) / calls


def graph_timer(fn: Callable[[], object], calls: int = 16, replays: int = 9) -> float:
    """GPU milliseconds of fn(): `calls` x (L2 flush, fn) captured in one CUDA graph, minus the same graph
    of flushes alone.

    Why graphs: decode is served from CUDA graphs (or torch.compile's), where the host launch cost that
    do_bench would include at small M is gone; timing it would make dense win every decode shape on host
    overhead alone. Why the flush: in a model every other layer's weights evict this one's from L2, so a
    weight small enough to stay cached between replays must not be timed from L2. Falls back to do_bench
    when fn cannot be captured."""
    import torch

    flush = _flush_buffer(torch.cuda.current_device())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # Preflight outside capture: a host sync inside fn would break the capture, and a capture that breaks
    # leaves the CUDA RNG in capture mode (the next torch.randn fails: "Offset increment outside graph
    # capture"), so fn must prove it has none before it is captured.
    old_mode = torch.cuda.get_sync_debug_mode()
    try:
        torch.cuda.set_sync_debug_mode("error")
        with torch.cuda.stream(side):  # capture needs a warm, non-default stream history
            fn()
            flush.zero_()
    except RuntimeError as e:
        log.info("sparserun: %s syncs with the host (%s); timing it with do_bench", fn, e)
        torch.cuda.synchronize()
        return do_bench_timer(fn)
    finally:
        torch.cuda.set_sync_debug_mode(old_mode)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:

        def both():
            flush.zero_()
            fn()

        with_fn = graph_replay_ms(both, calls, replays)
        alone = graph_replay_ms(flush.zero_, calls, replays)
        # a GPU op never costs nothing: floor at 1 us so a noisy subtraction cannot yield <= 0
        return max(with_fn - alone, 1e-3)
    except Exception as e:  # not capturable (a host sync inside, an allocator quirk): time it eagerly
        log.info("sparserun: graph timing failed (%s: %s); using do_bench", type(e).__name__, e)
        torch.cuda.synchronize()
        return do_bench_timer(fn)


class _FileLock:
    """Exclusive advisory lock on `path` (fcntl.flock); a no-op where fcntl does not exist."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: atomic replace still prevents torn files
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


CHOICES = frozenset(("triton", "cuda", "cusparselt", "dense"))  # what auto may choose (dispatch.ALL_BACKENDS)


def _valid_entry(v) -> bool:
    """A cache entry this code can use: a known backend as the choice, finite positive times by name. Anything
    else (hand-edited, another version) is dropped and re-tuned rather than crash a forward later."""
    if not isinstance(v, dict) or v.get("choice") not in CHOICES:
        return False
    times = v.get("times_ms", {})
    if not isinstance(times, dict):
        return False
    return all(isinstance(k, str) and isinstance(t, (int, float)) and not isinstance(t, bool)
               and math.isfinite(t) and t > 0 for k, t in times.items())


class Tuner:
    """choose(key, candidates) -> the name of the fastest candidate for `key`, timed once, cached on disk.

    candidates: name -> zero-argument callable that runs that backend once. `timer(fn) -> ms` is injectable
    (tests pass fake timings); `path=None` keeps choices in memory only.
    """

    def __init__(self, path: str | os.PathLike | None = None, timer: Callable | None = None,
                 margin: float = DEFAULT_MARGIN, dense: str = DENSE):
        self.path = Path(path) if path is not None else None
        self.timer = timer or graph_timer
        self.margin = margin
        self.dense = dense
        self._mem: dict[str, dict] = {}
        self._loaded = False
        self._lock = threading.Lock()
        self.tuned_now: list[str] = []  # keys timed by this process (reports, tests)
        self._warned: set = set()  # (path, mtime, size, problem) already warned about: once per bad file
        self._unreadable = False  # the file exists but cannot be read (permissions): never replace it

    # ---- disk -------------------------------------------------------------------------------------
    def _read_disk(self) -> dict[str, dict]:
        if self.path is None:
            return {}
        try:  # exists() itself raises on an unreadable parent (EACCES) or an over-long path (ENAMETOOLONG)
            if not self.path.exists():
                return {}
            try:
                text = self.path.read_text()
            except (PermissionError, IsADirectoryError) as e:
                # not corrupt, just not ours to read (another user's cache): replacing it would throw away
                # their entries; this process keeps its choices in memory instead
                self._unreadable = True
                self._warn_once(f"cannot be read ({e.strerror}); choices kept in memory, the file left as it is")
                return {}
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA or not isinstance(
                    data.get("entries"), dict):
                raise ValueError("not a sparserun tuning cache of schema %d" % SCHEMA)
            good = {k: v for k, v in data["entries"].items() if _valid_entry(v)}
            if len(good) < len(data["entries"]):
                self._warn_once(f"{len(data['entries']) - len(good)} malformed entries ignored (re-tuned)")
            return good
        except Exception as e:  # corrupt, truncated, foreign: re-tune and overwrite, never crash
            self._warn_once(f"unreadable ({e}); re-tuning")
            return {}

    def _warn_once(self, what: str) -> None:
        """Warn about a bad cache file once, not on every cache miss that rereads it."""
        try:
            st = self.path.stat()
            ident = (str(self.path), st.st_mtime_ns, st.st_size, what)
        except OSError:
            ident = (str(self.path), what)
        if ident not in self._warned:
            self._warned.add(ident)
            log.warning("sparserun: tuning cache %s: %s", self.path, what)

    def _load(self) -> None:
        if not self._loaded:
            self._mem.update(self._read_disk())
            self._loaded = True

    def _write(self, new: dict[str, dict]) -> None:
        if self.path is None:
            return
        try:
            with _FileLock(self.path.with_name(self.path.name + ".lock")):
                entries = self._read_disk()
                if self._unreadable:
                    self._mem.update(new)
                    return
                entries.update(new)
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self.path.name, suffix=".tmp")
                try:
                    with os.fdopen(fd, "w") as f:
                        json.dump({"schema": SCHEMA, "entries": entries}, f, indent=1, sort_keys=True)
                    # a cache in a shared SPARSERUN_CACHE_DIR must be readable by the users the umask allows
                    os.chmod(tmp, _umask_mode(0o666))
                    os.replace(tmp, self.path)
                except BaseException:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
                    raise
            self._mem.update(entries)
        except OSError as e:  # read-only home, full disk: keep the choice in memory, warn, go on
            log.warning("sparserun: could not write tuning cache %s: %s", self.path, e)

    # ---- API --------------------------------------------------------------------------------------
    def lookup(self, key: dict) -> str | None:
        """The cached choice for `key`, or None. Never times anything (safe during capture/compile)."""
        with self._lock:
            self._load()
            hit = self._mem.get(key_string(key))
        return hit["choice"] if hit else None

    def times(self, key: dict) -> dict[str, float]:
        """The measured milliseconds per backend behind the cached choice for `key` ({} if none)."""
        with self._lock:
            self._load()
            hit = self._mem.get(key_string(key))
        return dict(hit.get("times_ms", {})) if hit else {}

    def entries(self) -> dict[str, dict]:
        with self._lock:
            self._load()
            return dict(self._mem)

    def choose(self, key: dict, candidates: dict[str, Callable[[], object]],
               check: Callable[[object], float] | None = None) -> str:
        """The cached choice for `key`, else measure: each candidate runs once untimed, its output is checked
        (`check(output)` -> relative error vs a reference; over CHECK_TOL it is never chosen), then timed."""
        if not candidates:
            raise ValueError("Tuner.choose: no candidates")
        ks = key_string(key)
        with self._lock:
            self._load()
            hit = self._mem.get(ks)
            if hit is None:  # another process may have tuned it since we loaded
                hit = self._read_disk().get(ks)
                if hit is not None:
                    self._mem[ks] = hit
        if hit is not None and hit["choice"] in candidates:
            return hit["choice"]
        entry = self._measure(candidates, check)
        entry["when"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        with self._lock:
            self._mem[ks] = entry
            self.tuned_now.append(ks)
            self._write({ks: entry})
        return entry["choice"]

    def _measure(self, candidates: dict[str, Callable[[], object]],
                 check: Callable[[object], float] | None = None) -> dict:
        times: dict[str, float] = {}
        errors: dict[str, str] = {}
        for name, fn in candidates.items():
            try:
                out = fn()  # first use: compile, repack, allocate (never timed)
                if check is not None:
                    err = float(check(out))
                    if not err <= CHECK_TOL:  # NaN included
                        raise ValueError(f"wrong output: relative error {err:.3g} against the reference")
                ms = float(self.timer(fn))
                if not math.isfinite(ms) or ms <= 0:
                    raise ValueError(f"timer returned {ms!r}")
                times[name] = ms
            except Uncheckable:
                raise  # the input, not this candidate: the caller decides without tuning
            except Exception as e:  # a candidate that fails here is never chosen
                errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                log.info("sparserun: backend %s failed while tuning: %s", name, errors[name])
        if not times:
            raise RuntimeError("sparserun: every backend failed while tuning: " +
                           "; ".join(f"{k}: {v}" for k, v in errors.items()))
        choice = pick(times, self.dense, self.margin)
        out = {"choice": choice, "times_ms": times}
        if errors:
            out["errors"] = errors
        return out


class Uncheckable(Exception):
    """The tuning input's reference output holds NaN or Inf (NaN/Inf in x, or a value past the range of the
    output dtype): no output can be judged right or wrong on it, so nothing may be chosen and cached from it.
    Callers run their untuned choice for this call and tune on the next finite input."""


# A candidate's output on the tuning input must agree with the reference this closely (relative error of
# sampled rows and columns) to be timed at all: a fast backend that computes wrong on some GPU, driver or shape
# costs speed, never correctness. 16-bit kernels land near 1e-3.
CHECK_TOL = 2e-2


def pick(times: dict[str, float], dense: str = DENSE, margin: float = DEFAULT_MARGIN) -> str:
    """Fastest candidate; dense unless a sparse one is faster than dense by more than `margin`."""
    best = min(times, key=lambda n: (times[n], n != dense))
    if dense in times and best != dense and not times[best] < times[dense] * (1.0 - margin):
        return dense
    return best


# ---- process-wide tuner -------------------------------------------------------------------------------
_tuner: Tuner | None = None
_tuner_lock = threading.Lock()


def get_tuner() -> Tuner:
    global _tuner
    if _tuner is None:
        with _tuner_lock:
            if _tuner is None:
                _tuner = Tuner(default_cache_path())
    return _tuner


def set_tuner(tuner: Tuner | None) -> None:
    """Replace the process-wide tuner (tests; None = the default on next use)."""
    global _tuner
    _tuner = tuner


# ---- `sparserun bench tune DIR` -------------------------------------------------------------------------
def tune_model(model, m_values: Iterable[int] = M_BUCKETS, progress: Callable[[str], None] | None = None
               ) -> list[dict]:
    """Tune every distinct SparseLinear shape of `model` (already on a CUDA device) for each M bucket.

    Runs each layer shape once per M through the "auto" dispatcher (which times and caches); layers with
    the same key share the entry. Returns one row per (layer shape, M): key fields, choice and timings.
    """
    import torch

    from . import dispatch
    from .siblings import running_layers

    tuner = get_tuner()
    rows, seen = [], set()
    for name, layer in running_layers(model):  # grouped q/k/v and gate/up run as one wider layer: tune that
        if layer.format not in dispatch.KERNEL_FORMATS:
            continue
        for m in m_values:
            key = dispatch.tuning_key(layer, m, layer.values.dtype, layer.values.device)
            ks = key_string(key)
            if ks in seen:
                continue
            seen.add(ks)
            x = torch.randn(m, layer.in_features, device=layer.values.device, dtype=layer.values.dtype)
            with torch.no_grad():
                choice = dispatch.auto_backend(layer, x, allow_timing=True)
            entry = tuner.entries().get(ks, {})
            rows.append({"layer": name, "format": layer.format, "N": layer.out_features,
                         "K": layer.in_features, "M": m, "choice": choice,
                         "times_ms": entry.get("times_ms", {}), "errors": entry.get("errors", {})})
            if progress:
                t = entry.get("times_ms", {})
                progress(f"{layer.format} {layer.out_features}x{layer.in_features} M={m}: {choice}  " +
                         "  ".join(f"{k}={v:.4f}ms" for k, v in sorted(t.items())))
            dispatch.release_unused_caches(layer)
            del x
    return rows


def tune_dir(path: str, device: str = "cuda", dtype=None, m_values: Iterable[int] = M_BUCKETS,
             progress: Callable[[str], None] | None = print) -> list[dict]:
    """Load the packed checkpoint at `path` on `device` and tune all its sparse layer shapes."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        raise RuntimeError(f"bench tune needs a CUDA device (got device={device!r}, "
                           f"cuda available={torch.cuda.is_available()})")
    from . import io

    model = io.load(path, device=device, dtype=dtype)
    return tune_model(model, m_values, progress)


def _run_bench_tune(args) -> int:
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    try:
        m_values = [int(m) for m in args.m.split(",")] if args.m else list(M_BUCKETS)
    except ValueError:
        raise ValueError(f"--m takes comma-separated token counts such as 1,16,2048, got {args.m!r}") from None
    if any(m < 1 for m in m_values):
        raise ValueError(f"--m values must be >= 1, got {args.m!r}")
    if args.json:  # before the tuning, not after it: its timings would be lost
        from ..bench import timing

        if Path(args.json).is_dir():
            raise ValueError(f"--json {args.json} is a directory; give a file name")
        timing.check_out_dir(Path(args.json).absolute().parent, flag="--json's folder")
    if not str(args.device).startswith("cuda") or not torch.cuda.is_available():
        # ValueError: a usage error the CLI prints as one plain line, not as a crash
        raise ValueError(f"bench tune times GPU kernels and needs a CUDA device (got --device {args.device}, "
                         f"CUDA available: {torch.cuda.is_available()})")
    tuner = get_tuner()
    print(f"tuning cache: {tuner.path}", flush=True)
    rows = tune_dir(args.dir, device=args.device, dtype=dtype, m_values=m_values,
                    progress=None if args.quiet else (lambda line: print(line, flush=True)))
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["choice"]] = counts.get(r["choice"], 0) + 1
    print(f"tuned {len(rows)} (shape, M) keys: " +
          ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
    if args.json:
        from ..bench import timing

        timing.write_atomically(Path(args.json), lambda tmp: tmp.write_text(json.dumps(rows, indent=1)))
    return 0


def add_bench_tune(sub) -> None:
    p = sub.add_parser("tune", help="pre-tune the backend choice for every layer shape of a packed model",
                       description="Time every available backend that SPARSERUN_BACKENDS allows (default triton "
                                   "and dense; 'all' adds cuda and cusparselt) once for "
                                   "each distinct sparse layer shape of the packed checkpoint DIR and each M "
                                   "bucket, and store the fastest in the tuning cache that SparseLinear reads "
                                   "($SPARSERUN_CACHE_DIR, else $XDG_CACHE_HOME/sparserun or "
                                   "~/.cache/sparserun). Needs a CUDA GPU.")
    p.add_argument("dir", help="packed checkpoint directory")
    p.add_argument("--device", default="cuda", help="CUDA device (default: cuda)")
    p.add_argument("--dtype", choices=["fp16", "bf16"], default=None,
                   help="cast the model to this dtype first (default: as stored)")
    p.add_argument("--m", default=None,
                   help="comma-separated token counts to tune (default: the buckets 1,2,4,...,8192)")
    p.add_argument("--json", default=None, help="also write the per-key timings to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no per-key lines")
    p.set_defaults(func=_run_bench_tune)
