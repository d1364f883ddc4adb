"""A tiny random Llama, its tokenizer, and packed checkpoints of it, for the inference tests.

Shapes are multiples of 32 (hidden 64, kv projections 2 heads x 16 = 32, MLP 128) so every decoder Linear
can be held as 2:4 and as 32x32 blocks. `initializer_range=0.2` spreads the logits far enough apart that
greedy decoding has no near-ties, so "same tokens" is a meaningful, stable check. EOS is suppressed by
generating with `min_new_tokens` in the tests, because a random model may emit it at any step.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

VOCAB = 320  # the trainer's ceiling; the model's vocabulary is len(tokenizer)
TEXT = ("Sparse weights keep only the entries that matter. The ferry leaves the harbour at six. "
        "Memory bandwidth, not arithmetic, limits decoding one token at a time. " * 4)


def make_tokenizer():
    """A BPE tokenizer trained in memory (no download), as a PreTrainedTokenizerFast. Its alphabet is only the
    (ASCII) characters of TEXT, not all 256 bytes, so any token sequence a random model emits decodes to valid
    text and streamed text equals the decoded whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")


def llama(seed: int = 0, layers: int = 2, vocab: int | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = vocab or len(make_tokenizer())
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def packed_pair(out_dir: Path, pattern: str, sparsity: float | None = None, seed: int = 0, with_tokenizer=True):
    """(masked dense reference model, packed checkpoint dir): the reference holds exactly the weights the
    packed model holds, as dense nn.Linear with the pruned entries zeroed."""
    import sparserun
    from sparserun.runtime.linear import SparseLinear

    model = llama(seed)
    dense = copy.deepcopy(model)
    report = sparserun.sparsify_(model, pattern=pattern, sparsity=sparsity)
    assert len(report.sparsified) == 14, report.summary()  # 2 layers x 7 projections; lm_head stays dense
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, SparseLinear):
                dense.get_submodule(name).weight.copy_(mod.dense_weight())
    src = out_dir / "src"
    if with_tokenizer:
        make_tokenizer().save_pretrained(src)
    sparserun.save(model, out_dir / "packed", source_dir=src if with_tokenizer else None)
    return dense, out_dir / "packed"
