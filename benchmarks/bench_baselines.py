"""Copy bandwidth, dense cuBLAS and torch's own 2:4 path on the Llama shapes (see sparserun.bench.baselines)."""
import sys

from sparserun.bench.baselines import main

if __name__ == "__main__":
    sys.exit(main())
