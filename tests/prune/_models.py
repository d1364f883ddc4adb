"""Tiny random models and a tokenizer trained on the shipped calibration text, for prune/convert tests."""
from __future__ import annotations

from pathlib import Path

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
