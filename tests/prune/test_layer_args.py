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


def llava():
    """A forward that takes only **kwargs: it cannot be told use_cache=False, and its language model hands a
    KV cache to every layer (a layer re-run on it would attend to the keys of its earlier runs)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=V, hidden_size=H, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=V - 1)
    return LlavaForConditionalGeneration(cfg).eval(), "model.language_model.layers"


def jamba():
    """A hybrid stack: attention and Mamba layers of two classes, MoE experts in every other layer."""
    from transformers import JambaConfig, JambaForCausalLM

    cfg = JambaConfig(vocab_size=V, hidden_size=H, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                      attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                      mamba_dt_rank=8, max_position_embeddings=128)
    return JambaForCausalLM(cfg).eval(), "model.layers"


@pytest.mark.parametrize("build", [gemma3, t5, falcon, modernbert, llava, jamba])
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
    recorded = [v for c in inputs.calls for args, kw in c.values() for v in (*args, *kw.values())]
    assert not any(calibrate._is_cache(v) for v in recorded), "a KV cache among the recorded layer arguments"
    h = inputs.hidden
    for i, layer in enumerate(layers):
        want = torch.cat(truth[i])
        torch.testing.assert_close(h, want, rtol=1e-5, atol=1e-5, msg=f"input of layer {i}")
        with torch.no_grad():
            h = torch.cat([inputs.run(layer, h[s:s + 1], i, s) for s in range(h.shape[0])])


def test_llava_language_model_prunes_as_the_same_llama_does():
    """Text-only calibration of a VLM prunes its language model exactly as the same weights in a plain Llama:
    a KV cache left among the layer arguments would make each re-run layer attend to stale keys."""
    import sparserun
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vlm, _ = llava()
    text = vlm.config.text_config.to_dict()
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in text.items() if k != "model_type"})).eval()
    sd = {k.replace("model.language_model.", "model."): v for k, v in vlm.state_dict().items()
          if k.startswith(("model.language_model.", "lm_head."))}
    llama.load_state_dict(sd)
    ids = torch.randint(3, V - 1, (4, 24), generator=torch.Generator().manual_seed(1))
    ra = sparserun.prune(vlm, "sparsegpt", "2:4", calib=ids, progress=False)
    rb = sparserun.prune(llama, "sparsegpt", "2:4", calib=ids, progress=False)
    assert len(rb.masks) == 21
    for name, mask in rb.masks.items():
        assert torch.equal(ra.masks[name.replace("model.", "model.language_model.", 1)], mask), name


def test_a_forward_taking_only_kwargs_is_still_told_not_to_build_a_cache():
    """LLaVA's (and GraniteMoeHybrid's) forward names no use_cache: it goes through **kwargs to the backbone,
    which would otherwise build a cache (and a degenerate hybrid of only Mamba layers fails on it)."""
    model, _ = llava()
    ids = torch.randint(3, V - 1, (1, 8))
    assert calibrate.forward_inputs(model, ids)["use_cache"] is False
    lin = torch.nn.Linear(4, 4)  # no config, no cache to turn off
    assert "use_cache" not in calibrate.forward_inputs(lin, ids)
