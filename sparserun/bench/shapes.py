"""Layer shapes the benchmarks sweep: (name, N = out_features, K = in_features).

Llama-3.1-8B: hidden 4096, 32 q heads / 8 kv heads of 128, intermediate 14336.
Llama-3.1-70B: hidden 8192, intermediate 28672 (one MLP shape stands for the class).
"""

LLAMA_8B = [
    ("q_proj/o_proj 4096x4096", 4096, 4096),
    ("k_proj/v_proj 1024x4096", 1024, 4096),
    ("gate/up 14336x4096", 14336, 4096),
    ("down 4096x14336", 4096, 14336),
]
LLAMA_70B = [
    ("70B gate/up 28672x8192", 28672, 8192),
]
ALL_SHAPES = LLAMA_8B + LLAMA_70B

# Decode (1..64) through prefill (2048, 8192): where memory-bound turns compute-bound.
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 512, 2048, 8192]
