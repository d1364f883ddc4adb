"""Which stack of layers pruning goes through (calibrate.find_layers), on layouts that are not one plain list."""
import pytest
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


def test_a_stack_mixing_layer_classes_is_a_one_line_error_not_a_smaller_list_picked_silently():
    model = nn.Module()
    model.layers = nn.ModuleList([Block(32), Other(32), Block(32)])  # attention and mamba layers, say
    model.adapters = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
    with pytest.raises(calibrate.UnknownModelFamily, match=r"layers, mixes layer classes \(Block, Other\)"):
        calibrate.find_layers(model)
    model.big = nn.ModuleList([Block(64) for _ in range(2)])  # a larger single-class stack wins
    assert calibrate.find_layers(model)[0] == "big"


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
