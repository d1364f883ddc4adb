"""Runtime: SparseLinear, backend dispatch, model-level sparsify_/save/load."""
