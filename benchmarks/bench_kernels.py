"""sparserun's Triton kernels vs cuBLAS dense and torch's 2:4 on the Llama shapes (sparserun.bench.kernels)."""
import sys

from sparserun.bench.kernels import main

if __name__ == "__main__":
    sys.exit(main())
