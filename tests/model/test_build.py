"""Builders: real Hugging Face checkpoint layouts, the paper preset, and clear errors."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_batch, tiny_config, tokenizer
from transformers import CLIPVisionConfig, CLIPVisionModel, SamConfig, SamModel, T5Config, T5ForConditionalGeneration

from pixelllm.config import PixelLLMConfig, preset
from pixelllm.errors import CheckpointError, ConfigError
from pixelllm.model import PixelLLM, build_from_pretrained_parts, build_model

NATIVE = 256  # the tiny SAM / CLIP checkpoints' own canvas; the model runs at 160


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny SAM, CLIP and T5 checkpoints written with transformers' own save_pretrained."""
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    sam = SamModel(SamConfig(
        vision_config=dict(image_size=NATIVE, patch_size=8, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, window_size=4, global_attn_indexes=[1], output_channels=64,
                           mlp_dim=64, num_pos_feats=32),
        prompt_encoder_config=dict(image_size=NATIVE, image_embedding_size=NATIVE // 8, hidden_size=64,
                                   mask_input_channels=4),
        mask_decoder_config=dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, mlp_dim=64,
                                 iou_head_hidden_dim=64),
    ))
    with torch.no_grad():  # non-trivial tables, so that resizing is visible
        sam.vision_encoder.pos_embed.normal_()
        for layer in sam.vision_encoder.layers:
            layer.attn.rel_pos_h.normal_()
            layer.attn.rel_pos_w.normal_()
    sam.save_pretrained(root / "sam")
    clip = CLIPVisionModel(CLIPVisionConfig(image_size=NATIVE, patch_size=8, hidden_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, intermediate_size=96))
    clip.save_pretrained(root / "clip")
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=256, d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                             d_kv=16, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                             decoder_start_token_id=0))
    t5.save_pretrained(root / "t5")
    tokenizer().save_pretrained(root / "t5")
    return root, sam, clip, t5


def test_sam_loads_at_a_smaller_canvas_with_resized_tables(checkpoints):
    root, sam, clip, t5 = checkpoints
    config = tiny_config(frozen=True)
    model = build_from_pretrained_parts(config, sam=root / "sam", semantic=root / "clip", lm=root / "t5")
    grid = config.image_size // 8  # 20, from 32
    encoder = model.vision.sam
    assert encoder.pos_embed.shape == (1, grid, grid, 32)
    expected = F.interpolate(sam.vision_encoder.pos_embed.permute(0, 3, 1, 2), size=(grid, grid), mode="bicubic")
    torch.testing.assert_close(encoder.pos_embed, expected.permute(0, 2, 3, 1))
    global_rel = encoder.layers[1].attn.rel_pos_h
    assert global_rel.shape == (2 * grid - 1, 16)
    torch.testing.assert_close(
        global_rel, F.interpolate(sam.vision_encoder.layers[1].attn.rel_pos_h.T[None], size=2 * grid - 1,
                                  mode="linear")[0].T)
    torch.testing.assert_close(encoder.layers[0].attn.rel_pos_h, sam.vision_encoder.layers[0].attn.rel_pos_h)
    torch.testing.assert_close(encoder.layers[0].mlp.lin1.weight, sam.vision_encoder.layers[0].mlp.lin1.weight)
    # the frozen branch really is frozen, and the config records the loaded parts at the new size
    assert not any(p.requires_grad for p in encoder.parameters())
    assert model.config.sam["vision_config"]["image_size"] == config.image_size
    assert model.config.semantic["hidden_size"] == 48
    # the semantic tower's patch positions were resized too, and the LM weights are the checkpoint's
    assert model.vision.semantic.embeddings.position_embedding.weight.shape == (1 + grid * grid, 48)
    lm = model.language.model
    torch.testing.assert_close(lm.shared.weight, t5.shared.weight)
    out = model(make_batch(model.config))
    assert torch.isfinite(out.loss)


def test_composed_checkpoint_round_trips(checkpoints, tmp_path):
    root, *_ = checkpoints
    model = build_from_pretrained_parts(tiny_config(frozen=True), sam=root / "sam", semantic=root / "clip",
                                        lm=root / "t5").eval()
    batch = make_batch(model.config)
    model.save_pretrained(tmp_path / "pixelllm")
    loaded = PixelLLM.from_pretrained(tmp_path / "pixelllm")
    with torch.no_grad():
        assert torch.equal(model(batch).logits, loaded(batch).logits)


@pytest.fixture(scope="module")
def paper_model():
    with torch.device("meta"):
        return build_model(preset("paper"))


def test_paper_preset_counts(paper_model):
    model = paper_model
    sam = sum(p.numel() for p in model.vision.sam.parameters())
    semantic = sum(p.numel() for p in model.vision.semantic.parameters())
    lm = sum(p.numel() for n, p in model.language.named_parameters() if "lora_" not in n)
    assert 0.60e9 < sam < 0.66e9  # SAM ViT-H image encoder
    assert semantic == 303_753_152  # EVA02-L/14 at 384 px (its 27 x 27 + 1 position table)
    assert 2.7e9 < lm < 2.9e9  # Flan-T5-XL
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    # rank 32 on q and v of 24 encoder self-, 24 decoder self- and 24 cross-attention layers, 2048 wide
    assert lora == 3 * 24 * 2 * 32 * (2048 + 2048)
    counts = model.parameter_counts()
    assert counts["all"][0] - counts["all"][1] >= sam + lm
    assert list(counts) == ["vision", "prompt_encoder", "extractor", "language", "heads.location", "heads.mask",
                            "heads.proposals", "all"]


def test_the_paper_preset_is_the_official_configuration(paper_model):
    """LoRA scale 2 (alpha twice the rank), T5 dropout 0.1 active in training though the LM is frozen,
    and the EVA02-L/14 tower with drop path 0.1 (the scenic pixel_llm T5 configs)."""
    model = paper_model
    from peft.tuners.lora import LoraLayer

    scales = {layer.scaling["default"] for layer in model.language.modules() if isinstance(layer, LoraLayer)}
    assert scales == {2.0}
    dropouts = [m for m in model.language.model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and {m.p for m in dropouts} == {0.1}
    semantic = model.vision.semantic.config
    assert (semantic.model_type, semantic.hidden_size, semantic.num_hidden_layers, semantic.num_attention_heads,
            semantic.patch_size, semantic.intermediate_size, semantic.drop_path_rate) == (
        "pixelllm_eva02_vision", 1024, 24, 16, 14, 2730, 0.1)
    assert model.vision.semantic_grid == 27
    model.train()
    assert all(m.training for m in dropouts) and not model.vision.sam.training  # SAM stays frozen in eval
    model.eval()
    assert not any(m.training for m in dropouts)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")


def test_mismatched_widths():
    data = preset("tiny").to_dict()
    data["sam"]["prompt_encoder_config"]["hidden_size"] = 32
    with pytest.raises(ConfigError, match="sam widths disagree"):
        PixelLLMConfig.from_dict(data)
    data = preset("tiny").to_dict()
    data["extractor"]["heads"] = 5
    with pytest.raises(ConfigError, match="divisible"):
        PixelLLMConfig.from_dict(data)
    data = preset("tiny").to_dict()
    data["semantic"]["image_size"] = 224
    with pytest.raises(ConfigError, match="semantic image_size 224"):
        PixelLLMConfig.from_dict(data)
    data["semantic"]["image_size"] = 80
    with pytest.raises(ConfigError, match="semantic image_size 80 must be image_size 160 or a whole multiple"):
        PixelLLMConfig.from_dict(data)
    data["semantic"]["image_size"] = 320
    assert PixelLLMConfig.from_dict(data).pixel_scale == 2 and preset("tiny").pixel_scale == 1
    data = preset("tiny").to_dict()
    data["heads"]["location"]["kind"] = "grid"
    with pytest.raises(ConfigError, match="heads.location.kind must be 'mlp' or 'pointer', got 'grid'"):
        PixelLLMConfig.from_dict(data)
    with pytest.raises(ConfigError, match="unknown config field"):
        PixelLLMConfig.from_dict({**preset("tiny").to_dict(), "colour": 1})


def test_tokenizer_larger_than_vocabulary():
    data = preset("tiny").to_dict()
    data["lm"]["vocab_size"] = 50
    with pytest.raises(ConfigError, match="tokenizer has 200 tokens"):
        build_model(PixelLLMConfig.from_dict(data), tokenizer=tokenizer())


def test_checkpoint_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PixelLLM.from_pretrained(tmp_path / "nowhere")
    preset("tiny").save(tmp_path)
    with pytest.raises(CheckpointError, match="lacks model.safetensors"):
        PixelLLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="not valid JSON"):
        PixelLLM.from_pretrained(tmp_path)


def test_checkpoint_weights_that_do_not_match(tmp_path):
    model = build_model(tiny_config())
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["heads"]["location"]["hidden"] = 64
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="does not match its config.json"):
        PixelLLM.from_pretrained(tmp_path)


def test_hugging_face_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        build_from_pretrained_parts(tiny_config(), sam=tmp_path / "facebook-sam-vit-huge")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="lacks config.json"):
        build_from_pretrained_parts(tiny_config(), lm=tmp_path / "empty")


def _cache_repository(cache, repo: str, files) -> None:
    """Files in a Hugging Face hub cache (``models--org--name/snapshots/<commit>/`` and ``refs/main``),
    as ``hf download`` leaves them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for source in files:
        (snapshot / source.name).write_bytes(source.read_bytes())


def test_repository_ids_resolve_through_the_hugging_face_cache(checkpoints, tmp_path):
    """``org/name`` finds its snapshot in the hub's cache, offline; a repository not in it is a one-line
    error. Run in a fresh process, since the hub reads its cache and offline settings at import."""
    import subprocess
    import sys

    root, _, _, _ = checkpoints
    model = build_model(tiny_config(), tokenizer=tokenizer())
    model.save_pretrained(tmp_path / "pixelllm")
    cache = tmp_path / "cache"
    _cache_repository(cache, "someone/pixelllm-tiny", (tmp_path / "pixelllm").iterdir())
    _cache_repository(cache, "someone/t5-tiny", (root / "t5").iterdir())
    script = """
import sys, torch
from pixelllm.errors import CheckpointError
from pixelllm.model import PixelLLM, build_from_pretrained_parts
from helpers import tiny_config
model = PixelLLM.from_pretrained("someone/pixelllm-tiny")
reference = PixelLLM.from_pretrained(sys.argv[1])
assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
built = build_from_pretrained_parts(tiny_config(), lm="someone/t5-tiny")
assert built.language.model.config.d_model == 64
try:
    PixelLLM.from_pretrained("someone/missing")
except CheckpointError as exc:
    print(exc)
"""
    env = {**__import__("os").environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "pixelllm")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    message = done.stdout.strip().splitlines()[-1]
    assert "someone/missing is neither a local directory nor a repository in the Hugging Face cache" in message
