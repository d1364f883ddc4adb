"""Layer-by-layer calibration must feed each layer what the whole model would: per-layer masks and rotary
tables (Gemma 3's local/global layers), the position bias T5's first block hands to the others, tuples."""
import pytest
import torch

from sparserun.prune import calibrate

from ._models import one_cpu_thread  # noqa: F401 (autouse fixture)

V, H = 96, 64


def gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    # a sliding window much shorter than the window of tokens, and rope bases 10k (local) vs 1M (global): a
    # global layer run with the local layer's mask or rotary table gives clearly different outputs
    cfg = Gemma3TextConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"] * 2,
                           rope_local_base_freq=10.0, initializer_range=0.2)
    return Gemma3ForCausalLM(cfg).eval(), "model.layers"


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=V, d_model=H, d_ff=128, d_kv=16, num_layers=3, num_heads=4, pad_token_id=0,
                   decoder_start_token_id=0, initializer_factor=5.0)
    return T5ForConditionalGeneration(cfg).eval(), "decoder.block"


def falcon():
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=V, hidden_size=H, num_hidden_layers=3, num_attention_heads=4)
    return FalconForCausalLM(cfg).eval(), "transformer.h"


def modernbert():
    from transformers import ModernBertConfig, ModernBertModel

    cfg = ModernBertConfig(vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=128, global_attn_every_n_layers=2,
                           local_attention=4, global_rope_theta=1e6, local_rope_theta=10.0, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2)
    return ModernBertModel(cfg).eval(), "layers"


@pytest.mark.parametrize("build", [gemma3, t5, falcon, modernbert])
def test_layerwise_inputs_equal_the_whole_models(build):
    torch.manual_seed(0)
    model, path = build()
    path_found, layers = calibrate.find_layers(model)
    assert path_found == path
    ids = torch.randint(3, V, (2, 24))
    truth = {}

    def hook(i):
        def f(module, args, kwargs):
            truth.setdefault(i, []).append(calibrate._split_layer_call(args, kwargs)[0].clone())
        return f

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(**calibrate.forward_inputs(model, ids[s:s + 1]))
    for hd in handles:
        hd.remove()

    inputs = calibrate.capture_inputs(model, layers, ids, "cpu")
    calibrate.record_layer_args(model, path, layers, calibrate.InMemoryLayers(layers), inputs, ids, "cpu")
    h = inputs.hidden
    for i, layer in enumerate(layers):
        want = torch.cat(truth[i])
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5, msg=f"input of layer {i}")
        with torch.no_grad():
            h = torch.cat([inputs.run(layer, h[s:s + 1], i, s) for s in range(h.shape[0])])
