"""Convert, load and run tiny random models of many Hugging Face families (docs/models.md).

For each family and each (method, pattern) cell: `sparserun convert` (the CLI, in a subprocess), `sparserun
inspect`, `sparserun.load`, a forward pass, and for causal LMs greedy generation compared token for token
with the same pruning done in memory (`sparserun.prune` on the model from `from_pretrained`). Writes
benchmarks/results/model_families.json and prints one line per cell.

    python benchmarks/model_families.py [family ...]     # ~40 min for all on a 2-core CPU machine
                                                         # (with families: only their cells are replaced)
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sparserun  # noqa: E402
from tests.prune._models import make_tokenizer  # noqa: E402

H, I = 64, 128
CELLS = [("magnitude", "2:4", None), ("wanda", "2:4", None), ("sparsegpt", "32x32", 0.5),
         ("taylor", "16x16", 0.5)]


def families(vocab: int):
    """name -> (config, auto class name); 2 blocks, hidden 64, so that 16x16 and 32x32 blocks fit."""
    import transformers as T

    c = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    att = dict(hidden_size=H, intermediate_size=I, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=128)
    gqa = dict(att, num_key_value_heads=2)
    causal, base, s2s = "AutoModelForCausalLM", "AutoModel", "AutoModelForSeq2SeqLM"
    return {
        "llama": (T.LlamaConfig(**gqa, **c), causal),
        "mistral": (T.MistralConfig(**gqa, **c), causal),
        "qwen2": (T.Qwen2Config(**gqa, tie_word_embeddings=True, **c), causal),
        "qwen3": (T.Qwen3Config(**gqa, head_dim=16, **c), causal),
        "gemma": (T.GemmaConfig(**gqa, head_dim=16, **c), causal),
        "gemma2": (T.Gemma2Config(**gqa, head_dim=16, **c), causal),
        "phi3": (T.Phi3Config(**gqa, **c), causal),
        "phi": (T.PhiConfig(**att, **c), causal),
        "gpt2": (T.GPT2Config(n_embd=H, n_layer=2, n_head=4, n_positions=128, vocab_size=vocab,
                              bos_token_id=1, eos_token_id=2), causal),
        "opt": (T.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, word_embed_proj_dim=H, **c), causal),
        "gpt_neox": (T.GPTNeoXConfig(**att, **c), causal),
        "falcon": (T.FalconConfig(hidden_size=H, num_hidden_layers=2, num_attention_heads=4, **c), causal),
        "bloom": (T.BloomConfig(hidden_size=H, n_layer=2, n_head=4, **c), causal),
        "mixtral": (T.MixtralConfig(**gqa, num_local_experts=4, num_experts_per_tok=2, **c), causal),
        "qwen2_moe": (T.Qwen2MoeConfig(**gqa, moe_intermediate_size=64, shared_expert_intermediate_size=I,
                                       num_experts=4, num_experts_per_tok=2, **c), causal),
        "qwen3_moe": (T.Qwen3MoeConfig(**gqa, head_dim=16, moe_intermediate_size=64, num_experts=8,
                                       num_experts_per_tok=2, **c), causal),
        "olmoe": (T.OlmoeConfig(**gqa, num_experts=8, num_experts_per_tok=2, **c), causal),
        "gpt_oss": (T.GptOssConfig(**gqa, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                   layer_types=["full_attention"] * 2, **c), causal),
        "deepseek_v3": (T.DeepseekV3Config(**dict(att, num_key_value_heads=4), moe_intermediate_size=64,
                                           n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1,
                                           n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                                           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, **c), causal),
        "gemma3_text": (T.Gemma3TextConfig(**gqa, head_dim=16, **c), causal),
        "olmo2": (T.Olmo2Config(**gqa, **c), causal),
        "granite": (T.GraniteConfig(**gqa, **c), causal),
        "stablelm": (T.StableLmConfig(**gqa, **c), causal),
        "smollm3": (T.SmolLM3Config(**gqa, **c), causal),
        "cohere": (T.CohereConfig(**gqa, **c), causal),
        "gptj": (T.GPTJConfig(n_embd=H, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, vocab_size=vocab,
                              bos_token_id=1, eos_token_id=2), causal),
        "codegen": (T.CodeGenConfig(n_embd=H, n_layer=2, n_head=4, n_positions=128, rotary_dim=8, vocab_size=vocab,
                                    bos_token_id=1, eos_token_id=2), causal),
        "mpt": (T.MptConfig(d_model=H, n_layers=2, n_heads=4, max_seq_len=128, vocab_size=vocab), causal),
        "xglm": (T.XGLMConfig(d_model=H, ffn_dim=I, num_layers=2, attention_heads=4, max_position_embeddings=128,
                              **c), causal),
        "biogpt": (T.BioGptConfig(**att, **c), causal),
        "bert": (T.BertConfig(**att, vocab_size=vocab, pad_token_id=0), base),
        "roberta": (T.RobertaConfig(**dict(att, max_position_embeddings=130), vocab_size=vocab, pad_token_id=0),
                    base),
        "electra": (T.ElectraConfig(**att, embedding_size=H, vocab_size=vocab, pad_token_id=0), base),
        "deberta_v2": (T.DebertaV2Config(**att, vocab_size=vocab, pad_token_id=0), base),
        "mpnet": (T.MPNetConfig(**dict(att, max_position_embeddings=130), vocab_size=vocab, pad_token_id=0), base),
        "modernbert": (T.ModernBertConfig(**att, vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                          cls_token_id=1, sep_token_id=2), base),
        "distilbert": (T.DistilBertConfig(dim=H, hidden_dim=I, n_layers=2, n_heads=4, max_position_embeddings=128,
                                          vocab_size=vocab, pad_token_id=0), base),
        "t5": (T.T5Config(d_model=H, d_ff=I, d_kv=16, num_layers=2, num_heads=4, vocab_size=vocab, pad_token_id=0,
                          eos_token_id=2, decoder_start_token_id=0), s2s),
        "bart": (T.BartConfig(d_model=H, encoder_ffn_dim=I, decoder_ffn_dim=I, encoder_layers=2, decoder_layers=2,
                              encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=128, **c),
                 s2s),
        "marian": (T.MarianConfig(d_model=H, encoder_ffn_dim=I, decoder_ffn_dim=I, encoder_layers=2, decoder_layers=2,
                                  encoder_attention_heads=4, decoder_attention_heads=4, max_position_embeddings=128,
                                  decoder_start_token_id=0, **c), s2s),
        "phimoe": (T.PhimoeConfig(**gqa, num_local_experts=4, num_experts_per_tok=2, **c), causal),
        "mamba": (T.MambaConfig(hidden_size=H, num_hidden_layers=2, state_size=8, time_step_rank=8, **c), causal),
        # a vision tower beside the language model, and a forward that takes only **kwargs
        "llava": (T.LlavaConfig(text_config=dict(model_type="llama", **gqa, **c),
                                vision_config=dict(model_type="clip_vision_model", hidden_size=H, intermediate_size=I,
                                                   num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                                   patch_size=8, projection_dim=H),
                                image_token_id=vocab - 1), "AutoModelForImageTextToText"),
    }


def run_cell(src: Path, out: Path, auto, kind: str, tok, method: str, pattern: str, sparsity) -> dict:
    cmd = [sys.executable, "-m", "sparserun.cli", "convert", str(src), str(out), "--method", method, "--pattern",
           pattern, "--quiet", "--overwrite", "--nsamples", "4", "--seqlen", "32"]
    if sparsity:
        cmd += ["--sparsity", str(sparsity)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"status": "convert error", "detail": (r.stderr.strip().splitlines() or ["?"])[-1]}
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "inspect", str(out)], capture_output=True, text=True)
    if r.returncode:
        return {"status": "inspect error", "detail": r.stderr.strip()[-300:]}
    report = json.loads((out / "report.json").read_text())
    model = sparserun.load(out)
    ids = tok("The keeper wrote in the ledger", return_tensors="pt")["input_ids"]
    cell = {"status": "ok", "sparse_layers": sum(isinstance(m, sparserun.SparseLinear) for m in model.modules()),
            "dense_outside": len(report.get("dense_outside", [])),
            "pruned_param_fraction": report.get("pruned_param_fraction")}
    with torch.no_grad():
        if kind == "AutoModelForCausalLM":
            ref = auto.from_pretrained(src).eval()
            sparserun.prune(ref, method, pattern, sparsity, tokenizer=tok, nsamples=4, seqlen=32, progress=False)
            got = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            want = ref.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
            cell["same_tokens_as_in_memory_pruning"] = bool(torch.equal(got, want))
        elif kind == "AutoModelForSeq2SeqLM":
            model(input_ids=ids, decoder_input_ids=ids[:, :3])
        else:
            model(input_ids=ids)
    return cell


def main(argv: list[str]) -> int:
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    tok = make_tokenizer()
    table = families(len(tok))
    unknown = [a for a in argv if a not in table]
    if unknown:  # also --help: print the usage instead of a KeyError
        print(f"usage: python benchmarks/model_families.py [FAMILY ...]\n"
              f"converts, loads and runs a tiny random model of each family (all by default; named ones replace "
              f"their cells in benchmarks/results/model_families.json)\nfamilies: {' '.join(table)}",
              file=sys.stderr)
        return 0 if unknown in (["--help"], ["-h"]) else 2
    names = argv or list(table)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cfg, kind = table[name]
            auto = getattr(transformers, kind)
            src = Path(tmp) / name
            torch.manual_seed(0)
            auto.from_config(cfg).save_pretrained(src)
            tok.save_pretrained(src)
            for method, pattern, sparsity in CELLS:
                key = f"{name}/{method}/{pattern}"
                try:
                    cell = run_cell(src, Path(tmp) / "out", auto, kind, tok, method, pattern, sparsity)
                except Exception as e:  # a benchmark row, not a crash: record and go on
                    cell = {"status": "error", "detail": f"{type(e).__name__}: {e}"[:300]}
                results[key] = cell
                print(f"{key:32s} {cell['status']:14s} " + " ".join(f"{k}={v}" for k, v in cell.items()
                                                                      if k not in ("status",)), flush=True)
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": sys.version.split()[0]}
    path = ROOT / "benchmarks" / "results" / "model_families.json"
    if argv and path.is_file():  # some families: replace their cells in the last full run's file
        old = json.loads(path.read_text())
        results = {**{k: v for k, v in old["cells"].items() if k.split("/")[0] not in names}, **results}
    path.write_text(json.dumps({"environment": env, "cells": results}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
