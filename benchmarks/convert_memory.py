"""Does `sparserun convert`'s peak memory grow with depth? (docs/convert_memory.md)

For each depth: write a random fp32 Llama (same width) straight to sharded safetensors, then convert it in a
fresh process under GNU `/usr/bin/time -v` (wanda, 2:4, 4 x 64 calibration tokens, 8 MiB shards) and record
the kernel's "Maximum resident set size", next to the same process without the conversion (imports and
tokenizer only: the baseline) and the converter's own estimate (report.json's
memory_estimate, the formula in docs/convert_memory.md). tests/test_convert.py::test_memory_does_not_grow_
with_depth asserts the same with 4 and 8 layers.

    python benchmarks/convert_memory.py                       # 4 and 8 layers, hidden 1024
    python benchmarks/convert_memory.py --layers 4,8,16 --json /tmp/mem.json
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CODE = ("import sys; from sparserun.convert import convert; "
        "convert(sys.argv[1], sys.argv[2], 'wanda', '2:4', nsamples=4, seqlen=64, "
        "max_shard_bytes=8 << 20, progress=False)")


# the same process without the conversion: interpreter + torch + transformers + the Llama model code
BASELINE = ("import sys, torch, transformers, safetensors; from sparserun.convert import convert; "
            "from transformers import AutoTokenizer, LlamaForCausalLM; AutoTokenizer.from_pretrained(sys.argv[1])")


def peak_rss_kib(src: Path, out: Path, code: str = CODE) -> int:
    r = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", code, str(src), str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="4,8")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--repeats", type=int, default=2, help="runs per depth (the peak varies run to run)")
    ap.add_argument("--json", default=str(HERE / "results" / "convert_memory.json"))
    args = ap.parse_args(argv)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs GNU time at /usr/bin/time (apt-get install time)")

    sys.path.insert(0, str(ROOT))
    import torch
    import transformers

    import sparserun
    from tests.prune._models import write_random_llama_dir

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(x) for x in args.layers.split(",")):
            src = write_random_llama_dir(Path(tmp) / f"src{n}", layers=n, hidden=args.hidden,
                                         intermediate=args.intermediate)
            src_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
            base = peak_rss_kib(src, Path(tmp) / "unused", BASELINE)
            peaks = []
            for r in range(args.repeats):
                out = Path(tmp) / f"out{n}_{r}"
                peaks.append(peak_rss_kib(src, out))
                est = json.loads((out / "report.json").read_text())["memory_estimate"]
                shutil.rmtree(out)
            shutil.rmtree(src)
            row = {"layers": n, "source_mib": round(src_bytes / 2**20, 1),
                   "peak_rss_mib": [round(p / 1024, 1) for p in peaks],
                   "baseline_rss_mib": round(base / 1024, 1),
                   "estimate_mib": {k: round(v / 2**20, 1) for k, v in est.items()}}
            rows.append(row)
            print(json.dumps(row), flush=True)

    meta = {"model": f"random LlamaForCausalLM fp32, hidden {args.hidden}, intermediate {args.intermediate}, "
                     f"8 heads", "method": "wanda", "pattern": "2:4", "nsamples": 4, "seqlen": 64,
            "max_shard_bytes": 8 << 20, "measured_with": "/usr/bin/time -v (Maximum resident set size)",
            "sparserun": sparserun.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "device": "cpu"}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
