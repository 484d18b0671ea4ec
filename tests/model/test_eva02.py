"""The EVA02 semantic tower: the public timm checkpoint layout, the rope, drop path, the paper size."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel

from pixelllm.errors import CheckpointError
from pixelllm.model.eva02 import (
    Eva02VisionConfig,
    Eva02VisionModel,
    apply_rope,
    eva02_large,
    load_eva02_tower,
    rope_tables,
)

TINY = dict(image_size=56, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=48, rope_ref_grid=4)  # a 4 x 4 grid, head_dim 16
MIM, CLIP = "eva02_large_patch14_224", "eva02_large_patch14_clip_224"


def tiny_tower(**overrides) -> Eva02VisionModel:
    """A tiny tower with every parameter random (norms and tables included, so that each one matters)."""
    torch.manual_seed(0)
    tower = Eva02VisionModel(Eva02VisionConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.normal_(0, 0.2)
    return tower


def write_timm_checkpoint(directory, tower: Eva02VisionModel, architecture: str) -> None:
    """``tower`` as timm writes EVA02 to the hub: its keys, the final norm as ``fc_norm`` except in the
    CLIP towers, a 10-class ``head``, and timm's ``config.json`` (a custom size goes in ``model_args``)."""
    clip = "_clip_" in architecture
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    if not clip:
        state = {f"fc_{k}" if k.startswith("norm.") else k: v for k, v in state.items()}
    state["head.weight"], state["head.bias"] = torch.randn(10, 32), torch.zeros(10)
    save_file(state, str(directory / "model.safetensors"))
    config = {
        "architecture": architecture, "num_classes": 10, "num_features": 32, "global_pool": "token" if clip else "avg",
        "model_args": {"img_size": 56, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 1.5,
                       "ref_feat_shape": [4, 4]},
        "pretrained_cfg": {"tag": "test", "custom_load": False, "input_size": [3, 56, 56], "interpolation": "bicubic",
                           "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711],
                           "num_classes": 10, "first_conv": "patch_embed.proj", "classifier": "head"},
    }
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("architecture", [MIM, CLIP])
def test_public_layout_loads_to_the_same_features(tmp_path, architecture):
    source = tiny_tower(attn_inner_norm=architecture == CLIP)
    write_timm_checkpoint(tmp_path, source, architecture)
    loaded = load_eva02_tower(tmp_path, 56).eval()
    assert loaded.config.attn_inner_norm == (architecture == CLIP)
    assert (loaded.config.intermediate_size, loaded.config.rope_ref_grid) == (48, 4)
    images = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=images).last_hidden_state, source(pixel_values=images).last_hidden_state)


def test_public_layout_loads_at_a_larger_size(tmp_path):
    source = tiny_tower()
    write_timm_checkpoint(tmp_path, source, MIM)
    loaded = load_eva02_tower(tmp_path, 84, drop_path_rate=0.2)  # grid 6, from 4
    table = source.pos_embed.detach()
    assert loaded.pos_embed.shape == (1, 1 + 36, 32)
    torch.testing.assert_close(loaded.pos_embed[:, :1], table[:, :1], rtol=0, atol=0)  # the class entry is kept
    grid = table[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 36, 32)
    torch.testing.assert_close(loaded.pos_embed[:, 1:], expected)
    assert loaded.config.rope_ref_grid == 4  # the checkpoint's reference, as timm keeps it
    assert loaded.blocks[-1].drop_path.rate == pytest.approx(0.2)
    assert load_eva02_tower(tmp_path, 84, rope_ref_grid=6).config.rope_ref_grid == 6
    with torch.no_grad():
        features = loaded.eval()(pixel_values=torch.randn(2, 3, 84, 84)).last_hidden_state
    assert features.shape == (2, 36, 32) and features.isfinite().all()


def test_output_is_the_normalized_patch_tokens():
    tower = tiny_tower()
    seen = {}
    tower.norm.register_forward_hook(lambda module, args, output: seen.update(tokens=args[0]))
    with torch.no_grad():
        features = tower(pixel_values=torch.randn(3, 3, 56, 56)).last_hidden_state
    assert seen["tokens"].shape == (3, 1 + 16, 32)  # the class token went through the blocks
    assert features.shape == (3, 16, 32)
    torch.testing.assert_close(features, tower.norm(seen["tokens"])[:, 1:], rtol=0, atol=0)


def test_drop_path_only_in_training():
    tower = tiny_tower(drop_path_rate=0.5)
    assert [block.drop_path.rate for block in tower.blocks] == [0.0, 0.5]  # linear over depth
    images = torch.randn(8, 3, 56, 56)
    with torch.no_grad():
        tower.train()
        first, second = (tower(pixel_values=images).last_hidden_state for _ in range(2))
        assert not torch.equal(first, second)
        tower.eval()
        first, second = (tower(pixel_values=images).last_hidden_state for _ in range(2))
        plain = Eva02VisionModel(Eva02VisionConfig(**TINY)).eval()
        plain.load_state_dict(tower.state_dict())
        assert torch.equal(first, second) and torch.equal(first, plain(pixel_values=images).last_hidden_state)


def test_rope_convention_by_hand():
    # head_dim 8: channels 0-3 rotate by the row, 4-7 by the column, frequencies 1 and 10000 ** -0.5
    sin, cos = rope_tables(grid=4, ref_grid=4, head_dim=8, theta=10000.0)
    token = 2 * 4 + 3  # row 2, column 3 (row-major)
    unit = torch.eye(8)
    rotated = apply_rope(unit, sin[token], cos[token])  # row i: channel i's unit vector, rotated
    for channel, angle in [(0, 2.0), (2, 2.0 * 0.01), (4, 3.0), (6, 3.0 * 0.01)]:
        expected = torch.zeros(8)
        expected[channel], expected[channel + 1] = math.cos(angle), math.sin(angle)
        torch.testing.assert_close(rotated[channel], expected)
        expected[channel], expected[channel + 1] = -math.sin(angle), math.cos(angle)
        torch.testing.assert_close(rotated[channel + 1], expected)
    sin, cos = rope_tables(grid=4, ref_grid=2, head_dim=8, theta=10000.0)  # positions scaled by 2 / 4
    torch.testing.assert_close(apply_rope(unit, sin[token], cos[token])[0, :2], torch.tensor([math.cos(1.0),
                                                                                            math.sin(1.0)]))


def test_rope_keeps_norms_and_makes_logits_relative():
    torch.manual_seed(0)
    sin, cos = rope_tables(grid=5, ref_grid=3, head_dim=16, theta=10000.0)
    x = torch.randn(2, 3, 25, 16)
    torch.testing.assert_close(apply_rope(x, sin, cos).norm(dim=-1), x.norm(dim=-1))
    q, k = torch.randn(16).expand(25, 16), torch.randn(16).expand(25, 16)  # the same vectors everywhere
    logits = (apply_rope(q, sin, cos) @ apply_rope(k, sin, cos).T).reshape(5, 5, 5, 5)  # [row, col, row', col']
    torch.testing.assert_close(logits[1:, 1:, 1:, 1:], logits[:-1, :-1, :-1, :-1])  # a shared shift changes nothing
    torch.testing.assert_close(logits[1:, :, 1:, :], logits[:-1, :, :-1, :])
    assert not torch.allclose(logits[0, 0, 0, 0], logits[0, 0, 0, 1])  # but the offset does matter


def test_attention_rotates_only_the_patch_tokens():
    tower = tiny_tower()
    attention = tower.blocks[0].attn
    x = torch.randn(2, 17, 32)
    sin, cos = rope_tables(4, 4, 16, 10000.0)
    with torch.no_grad():
        heads = [proj(x).view(2, 17, 2, 16).transpose(1, 2)
                 for proj in (attention.q_proj, attention.k_proj, attention.v_proj)]
        q, k, v = heads
        q = torch.cat([q[:, :, :1], apply_rope(q[:, :, 1:], sin, cos)], dim=2)
        k = torch.cat([k[:, :, :1], apply_rope(k[:, :, 1:], sin, cos)], dim=2)
        weights = (q @ k.transpose(-1, -2) / 4.0).softmax(-1)
        expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 17, 32))
        torch.testing.assert_close(attention(x, sin, cos), expected)
    assert attention.k_proj.bias is None and attention.q_proj.bias is not None  # no k bias, as EVA02


def test_gradient_checkpointing_recomputes_the_blocks():
    tower = tiny_tower().train()
    images = torch.randn(2, 3, 56, 56)
    tower(pixel_values=images).last_hidden_state.square().sum().backward()
    plain = [p.grad.clone() for p in tower.parameters()]
    tower.zero_grad()
    calls = []
    tower.blocks[0].mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    tower.activation_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in tower.blocks)
    tower(pixel_values=images).last_hidden_state.square().sum().backward()
    assert len(calls) == 2  # the forward, then its recomputation in the backward
    for expected, parameter in zip(plain, tower.parameters(), strict=True):
        torch.testing.assert_close(parameter.grad, expected)


def test_paper_size_on_meta():
    data = eva02_large(384)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        tower = AutoModel.from_config(config)
    assert isinstance(tower, Eva02VisionModel) and tower.grid == 27 and config.rope_ref_grid == 27
    assert [tower.blocks[0].drop_path.rate, tower.blocks[-1].drop_path.rate] == [0.0, pytest.approx(0.1)]
    block = (2 * 1024 + 3 * (1024 * 1024 + 1024) + 1024 * 1024  # norm1, q/v/proj with biases, k without
             + 2 * 1024 + 2 * (1024 * 2730 + 2730) + 2 * 2730 + 2730 * 1024 + 1024)  # norm2, fc1_g/x, sub-LN, fc2
    patch_embed, cls_token, pos_embed, norm = 1024 * 3 * 14 * 14 + 1024, 1024, (1 + 27 * 27) * 1024, 2 * 1024
    assert block == 12_599_976
    # the public EVA02-L/14 (303,268,800 at 224 px, timm's 303.3 M) with its table at 27 x 27
    assert sum(p.numel() for p in tower.parameters()) == 24 * block + patch_embed + cls_token + pos_embed + norm
    assert sum(p.numel() for p in tower.parameters()) == 303_753_152


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_eva02_tower(tmp_path / "nowhere", 56)
    write_timm_checkpoint(tmp_path, tiny_tower(), MIM)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        load_eva02_tower(tmp_path, 56)
    tower = tiny_tower()
    write_timm_checkpoint(tmp_path, tower, MIM)
    save_file({**{k: v.contiguous() for k, v in tower.state_dict().items()}, "blocks.0.attn.extra": torch.zeros(1)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 unexpected keys \['blocks.0.attn.extra'\], 0 missing"):
        load_eva02_tower(tmp_path, 56)


def test_config_errors(tmp_path):
    write_timm_checkpoint(tmp_path, tiny_tower(), MIM)
    config = json.loads((tmp_path / "config.json").read_text())
    for change, message in [
        ({"architecture": "eva02_tiny_patch14_224"}, "'eva02_tiny_patch14_224' is not a timm EVA02 base/large"),
        ({"architecture": CLIP}, r"not the timm EVA02-CLIP \(attn.norm\) layout .* 4 missing keys"),
        ({"model_args": {**config["model_args"], "class_token": False}}, r"model_args \['class_token'\]"),
        ({"model_args": {**config["model_args"], "embed_dim": 64}}, "has shape .* needs"),
    ]:
        (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=message):
            load_eva02_tower(tmp_path, 56)
