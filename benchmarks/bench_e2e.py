"""End-to-end decode benchmark on a Llama-3.1-8B-shaped model with random weights (sparserun.bench.e2e).

    python benchmarks/bench_e2e.py                      # everything (long: see docs/inference.md for a budget)
    python benchmarks/bench_e2e.py --batches 1 --prompts 128 --modes eager,cudagraphs
    python benchmarks/bench_e2e.py --dry-run --out /tmp/e2e   # CPU, tiny config: checks the harness
"""
import sys

from sparserun.bench.e2e import main

if __name__ == "__main__":
    sys.exit(main())
