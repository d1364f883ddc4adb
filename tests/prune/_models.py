"""Tiny random models and a tokenizer trained on the shipped calibration text, for prune/convert tests."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparserun.prune.calibrate import DEFAULT_CALIB


def make_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on the shipped calibration text (a PreTrainedTokenizerFast)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([DEFAULT_CALIB.read_text()], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def llama_config(vocab_size: int, layers: int = 2, hidden: int = 64, intermediate: int = 128, **kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def make_llama(tokenizer, layers: int = 2, seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(len(tokenizer), layers, **kw)).eval()


def save_llama_dir(path: Path, layers: int = 2, seed: int = 0, **kw) -> Path:
    """A HF model directory (config, safetensors, tokenizer) of a tiny random fp32 Llama."""
    tok = make_tokenizer()
    model = make_llama(tok, layers, seed, **kw)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)


def write_random_llama_dir(path: Path, layers: int, hidden: int, intermediate: int, *, seed: int = 0,
                           shard_bytes: int = 64 * 1024 * 1024, **kw) -> Path:
    """A HF Llama directory with random fp32 weights written straight to sharded safetensors (with an
    index), without ever building the model: cheap even when the model is large."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    cfg = llama_config(len(tok), layers, hidden, intermediate, num_attention_heads=8, num_key_value_heads=8,
                       **kw)
    cfg.architectures = ["LlamaForCausalLM"]
    cfg.save_pretrained(path)
    tok.save_pretrained(path)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    shards, cur, cur_bytes = [], {}, 0
    for k, shape in shapes.items():
        t = torch.ones(shape) if k.endswith("norm.weight") else torch.randn(shape, generator=g) * 0.05
        cur[k] = t
        cur_bytes += t.numel() * 4
        if cur_bytes >= shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
    if cur:
        shards.append(cur)
    weight_map = {}
    for i, sh in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(sh, str(path / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in sh})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture(autouse=True, scope="module")
def one_cpu_thread():
    """Run a module's tests with one intra-op thread (restored afterwards).

    These tests run many small ops (tiny models, per-window forwards); on a machine whose cores are
    shared with other jobs, intra-op threads make each op wait for descheduled threads (measured: MiniLM
    conversions 20-40x slower with 2 threads on a loaded 2-core machine, about equal when idle)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Mixture-of-experts families, each breaking one assumption about 3-D experts (runtime/experts.py): Mixtral
# saves per-expert w1/w2/w3 under an older module name, Qwen3-MoE per-expert gate/up/down, OLMoE the same with
# q/k norms, gpt-oss its fused 3-D tensors transposed with biases and its own clamped gate, DeepSeek-V3 a
# dense first layer and shared experts beside the routed ones.
MOE_FAMILIES = ("mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3")


def make_moe(family: str, vocab_size: int, layers: int = 2, seed: int = 0, hidden: int = 64):
    """A tiny random MoE causal LM of `family` (4-8 experts, top-2), weights drawn with std 0.1 so routing and
    pruning have something to choose between; pytest.skip if this transformers lacks the family."""
    import transformers as T

    common = dict(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=128, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                  tie_word_embeddings=False)
    specs = {
        "mixtral": ("MixtralConfig", dict(intermediate_size=96, num_key_value_heads=2, num_local_experts=4)),
        "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2,
                                             num_experts=8, head_dim=16)),
        "olmoe": ("OlmoeConfig", dict(intermediate_size=32, num_key_value_heads=4, num_experts=8)),
        "gpt_oss": ("GptOssConfig", dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=4,
                                         head_dim=16, layer_types=["full_attention"] * layers)),
        "deepseek_v3": ("DeepseekV3Config", dict(intermediate_size=96, moe_intermediate_size=32,
                                                 num_key_value_heads=4, n_routed_experts=8, first_k_dense_replace=1,
                                                 n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                                 qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)),
    }
    specs.update({  # not in MOE_FAMILIES (CI time): each tests one thing around the experts
        # a router held as a Parameter, and a shared expert gated by a Linear with one output
        "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=96, moe_intermediate_size=32, num_key_value_heads=2,
                                             num_experts=4, shared_expert_intermediate_size=48)),
        # a router that is a Linear subclass returning a tuple
        "phimoe": ("PhimoeConfig", dict(intermediate_size=32, num_key_value_heads=2, num_local_experts=4)),
        # a hybrid stack: a Mamba layer, then an attention layer with experts (two layer classes)
        "jamba": ("JambaConfig", dict(intermediate_size=64, num_key_value_heads=2, num_experts=4,
                                      attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                      expert_layer_offset=1, mamba_d_state=8, mamba_dt_rank=8)),
        # experts as 3-D tensors outside transformers' experts contract
        "jetmoe": ("JetMoeConfig", dict(intermediate_size=32, num_key_value_heads=2, kv_channels=16,
                                        num_local_experts=4)),
    })
    cls_name, kw = specs[family]
    cls = getattr(T, cls_name, None)
    if cls is None:
        pytest.skip(f"transformers {T.__version__} has no {cls_name}")
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cls(**common, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(std=0.1)
    return model
