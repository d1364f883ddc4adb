"""Which stack of layers pruning goes through (calibrate.find_layers), on layouts that are not one plain list."""
import pytest
import torch
import torch.nn as nn

from sparserun.prune import calibrate


class Block(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.up, self.down = nn.Linear(h, 2 * h), nn.Linear(2 * h, h)


class Other(Block):
    pass


class VLM(nn.Module):
    """A vision tower larger than the language model, which get_decoder() names."""

    def __init__(self):
        super().__init__()
        self.vision = nn.ModuleList([Block(32) for _ in range(4)])
        self.language = nn.Module()
        self.language.layers = nn.ModuleList([Block(16) for _ in range(2)])

    def get_decoder(self):
        return self.language


def test_the_language_model_get_decoder_names_is_pruned_even_when_the_vision_tower_is_larger():
    model = VLM()
    assert calibrate.find_layers(model)[0] == "language.layers"
    model.get_decoder = lambda: model  # a base model's get_decoder: itself, so the largest list anywhere
    assert calibrate.find_layers(model)[0] == "vision"


def test_a_hybrid_stack_is_the_stack_not_a_smaller_one_class_list_beside_it():
    model = nn.Module()
    model.layers = nn.ModuleList([Block(32), Other(32), Block(32)])  # attention and mamba layers, say
    model.adapters = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])  # Zamba2's LoRA adapters, say
    assert calibrate.find_layers(model)[0] == "layers"
    model.big = nn.ModuleList([Block(64) for _ in range(2)])  # a larger single-class stack wins
    assert calibrate.find_layers(model)[0] == "big"


def test_a_stack_whose_layers_share_a_module_is_a_one_line_error():
    """Zamba2's hybrid layers hold one shared transformer block: pruned layer by layer, it would be pruned once
    per layer that holds it."""
    model = nn.Module()
    shared = Block(32)
    model.layers = nn.ModuleList([Block(32), Other(32), Other(32)])
    model.layers[1].shared, model.layers[2].shared = shared, shared
    with pytest.raises(calibrate.UnknownModelFamily, match=r"layers share modules or weights \(2\.shared\)"):
        calibrate.find_layers(model)


def test_a_list_of_lists_is_not_a_stack_of_blocks_but_each_inner_list_may_be():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.ModuleList([Block(32)]) for _ in range(3)])  # Funnel's encoder: not callable
    model.layers = nn.ModuleList([Block(48) for _ in range(2)])
    assert calibrate.find_layers(model)[0] == "layers"
    model.blocks[1].extend([Block(32) for _ in range(4)])
    assert calibrate.find_layers(model)[0] == "blocks.1"


def test_llava_with_a_larger_vision_tower_prunes_its_language_model():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2)
    vision = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    model = LlavaForConditionalGeneration(LlavaConfig(text_config=text, vision_config=vision, image_token_id=63))
    assert [st.path for st in calibrate.find_stacks(model)] == ["model.language_model.layers"]


def test_hidden_states_that_are_not_batch_first_are_a_one_line_error():
    """Gemma 3n feeds its layers [streams, batch, tokens, hidden]: layer-by-layer calibration cannot slice that
    per window, and says so with the route that works (sparsify_), before any layer is pruned."""
    import torch
    import transformers as T

    import sparserun

    if not hasattr(T, "Gemma3nTextConfig"):
        pytest.skip("this transformers has no Gemma 3n")
    cfg = T.Gemma3nTextConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_kv_shared_layers=0,
                              laurel_rank=4, altup_num_inputs=2, hidden_size_per_layer_input=4,
                              vocab_size_per_layer_input=64, activation_sparsity_pattern=[0.0, 0.0],
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
    model = T.Gemma3nForCausalLM(cfg).eval()
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    ids = torch.randint(3, 60, (2, 16))
    with pytest.raises(calibrate.CalibrationError, match=r"model\.layers\.0 .* are \(2, 1, 16, 32\), not \[1, tokens"):
        sparserun.prune(model, "wanda", "2:4", calib=ids, progress=False)
    assert model.model.layers[0].self_attn.q_proj.weight.equal(before)


def test_a_stack_the_text_forward_never_reaches_is_a_one_line_error():
    import torch

    class Skips(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 16)
            self.layers = nn.ModuleList([Block(16) for _ in range(2)])

        def forward(self, input_ids):
            return self.embed(input_ids)  # the layers are never called (a cross-attention stack, say)

    with pytest.raises(calibrate.CalibrationError, match=r"never reaches layers\.0, the stack chosen for pruning"):
        model = Skips()
        calibrate.capture_inputs(model, model.layers, torch.randint(0, 10, (2, 5)), "cpu")


def test_position_limit_reads_text_configs_and_ignores_negative_sentinels():
    """XLNet says max_position_embeddings = -1 (no limit); a VLM keeps its limit in its text config."""
    import transformers as T

    from sparserun.prune.api import default_seqlen, position_limit

    assert position_limit(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4)) == (None, "")
    assert default_seqlen(T.XLNetConfig(vocab_size=64, d_model=32, n_layer=1, n_head=4)) == calibrate.DEFAULT_SEQLEN
    text = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, max_position_embeddings=96)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, image_size=32, patch_size=8, projection_dim=32)
    cfg = T.LlavaConfig(text_config=text, vision_config=vision, image_token_id=63)
    assert position_limit(cfg) == (96, "text_config.max_position_embeddings")
    assert position_limit(T.GPT2Config(n_positions=40)) == (40, "n_positions")
    # RoBERTa counts positions from pad_token_id + 1: a window as long as max_position_embeddings crashed
    cfg = T.RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=66, pad_token_id=1)
    limit, field = position_limit(cfg)
    assert (limit, field) == (64, "max_position_embeddings - pad_token_id - 1")
    model = T.RobertaModel(cfg).eval()
    with torch.no_grad():
        model(torch.full((1, limit), 5))  # the longest window the limit allows runs
    with pytest.raises(Exception):
        model(torch.full((1, limit + 1), 5))
