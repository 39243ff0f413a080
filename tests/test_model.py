"""Model-level behaviour: parity with transformers' Llama, packed vision attention, M-RoPE, save/load."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config
from keye.rope import TextSpan, VisionSpan, mrope_positions


def test_text_logits_match_transformers_llama():
    """keye's text model with SmolLM2 weights (keye-tiny before its trained LoRA) == transformers' LlamaForCausalLM on
    the same GGUF (fp32)."""
    from transformers import LlamaForCausalLM

    from keye import load_pretrained
    from keye.pretrained import keye_tiny_base, smollm2_gguf

    model, processor = load_pretrained(str(keye_tiny_base()), dtype=torch.float32)
    gguf = smollm2_gguf()
    ref = LlamaForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ids = processor([{"role": "user", "content": "Name three colours of the rainbow."}])["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., : ref.config.vocab_size]
        theirs = ref(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


def test_text_only_mrope_is_1d_rope(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 11))
    pos1d = torch.arange(11).expand(2, -1)
    with torch.no_grad():
        a = model(input_ids=ids, position_ids=pos1d).logits
        b = model(input_ids=ids, position_ids=pos1d[None].expand(3, -1, -1)).logits
        c = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    torch.testing.assert_close(a, c, atol=0, rtol=0)


def test_logits_to_keep_a_mask_gives_the_rows_of_those_positions(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 9))
    keep = torch.rand(2, 9) > 0.5
    with torch.no_grad():
        full = model(input_ids=ids).logits  # (2, 9, V)
        kept = model(input_ids=ids, logits_to_keep=keep).logits  # (N, V)
        last = model(input_ids=ids, logits_to_keep=3).logits
    torch.testing.assert_close(kept, full[keep], atol=1e-5, rtol=0)
    torch.testing.assert_close(last, full[:, -3:], atol=1e-5, rtol=0)


def test_packed_vision_attention_equals_separate(tiny_model):
    """Different-size images (one size twice) packed in one sequence give the same features as each run alone."""
    model = tiny_model()
    grids = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4], [1, 4, 6]])
    pixels = [torch.randn(int(g.prod()), 3 * 14 * 14) for g in grids]
    with torch.no_grad():
        packed = model.vision(torch.cat(pixels), grids)
        alone = torch.cat([model.vision(p, g[None]) for p, g in zip(pixels, grids)])
    assert packed.shape == (sum(int(g.prod()) for g in grids), 32)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_projector_merges_2x2_blocks(tiny_model):
    model = tiny_model()
    feats = torch.arange(4 * 4, dtype=torch.float).view(16, 1).expand(16, 32)  # patch k has value k
    merged = model.projector.merge_patches(feats, torch.tensor([[1, 4, 4]]))  # (4, 4*32)
    first = merged.view(4, 4, 32)[:, :, 0]  # the 4 patches of each merged token
    assert first.tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_mrope_positions_hand_worked():
    spans = [
        TextSpan(3),
        VisionSpan(2, 3),  # image: 2x3 merged tokens
        TextSpan(2),
        VisionSpan(1, 2, time=0.0, video=0),
        TextSpan(2),
        VisionSpan(1, 2, time=1.5, video=0),
        TextSpan(1),
    ]
    pos = mrope_positions(spans, tokens_per_second=2.0)
    expected = [
        [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8, 8, 10, 11, 11, 11, 14],  # temporal: frame at 1.5 s -> 8 + 3
        [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8, 8, 10, 11, 12, 12, 14],  # height
        [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],  # width
    ]
    assert pos.tolist() == expected
    # Keye-VL-1.5's released rule (no time scaling): the frame's temporal index is its start.
    legacy = mrope_positions(spans, tokens_per_second=None)
    assert legacy[0].tolist()[15:17] == [12, 12]
    assert torch.equal(legacy[1:], pos[1:])


def test_vision_pad_mismatch_is_a_clear_error(tiny_model):
    model = tiny_model()
    cfg = model.config
    ids = torch.full((1, 6), 5)
    ids[0, 1:4] = cfg.image_token_id  # 3 slots, but a 4x4-patch image gives 4 tokens
    try:
        model(
            input_ids=ids,
            pixel_values=torch.randn(16, 588),
            image_grid_thw=torch.tensor([[1, 4, 4]]),
            position_ids=torch.arange(6)[None, None].expand(3, 1, -1),
        )
    except ValueError as e:
        assert "3 <image_pad> tokens" in str(e) and "produced 4" in str(e)
    else:
        raise AssertionError("mismatch not detected")


def test_save_load_round_trip_is_exact(tiny_model, tmp_path):
    from keye import KeyeForConditionalGeneration

    for kw in ({"qk_norm": True}, {"qk_norm": False, "tie": True}):
        model = tiny_model(**kw)
        model.save_pretrained(tmp_path / str(kw))
        assert (tmp_path / str(kw) / "model.safetensors").exists()
        loaded = KeyeForConditionalGeneration.from_pretrained(tmp_path / str(kw)).eval()
        for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
        ids = torch.randint(0, 200, (1, 9))
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)


def test_auto_classes_are_registered(tmp_path):
    from transformers import AutoConfig, AutoModelForImageTextToText

    import keye

    config = tiny_config()
    config.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), keye.KeyeConfig)
    assert isinstance(AutoModelForImageTextToText.from_config(config), keye.KeyeForConditionalGeneration)


def test_temporal_branch_starts_as_no_change_then_reads_the_reference_frame():
    from keye.configuration import KeyeProjectorConfig
    from keye.modeling import KeyeForConditionalGeneration
    from keye.training.testing import tiny_config

    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(
        tiny_config(projector_config=KeyeProjectorConfig(temporal_hidden_size=16))
    ).eval()
    grid = torch.tensor([[1, 4, 4], [1, 2, 2], [1, 2, 2]])  # a slow frame, then two fast frames
    pixels = torch.randn(16 + 4 + 4, 3 * 14 * 14)
    ref = torch.tensor([0, 0, 0])  # the fast frames compare with the slow one
    with torch.no_grad():
        plain = model.encode_vision(pixels, grid)
        torch.testing.assert_close(model.encode_vision(pixels, grid, ref), plain)  # zero-initialised: Keye's
        model.projector.temporal.linear_2.weight.normal_(std=0.1)
        with_ref = model.encode_vision(pixels, grid, ref)
        other = pixels.clone()
        other[:16] = torch.randn(16, 3 * 14 * 14)  # change only the slow (reference) frame
        changed = model.encode_vision(other, grid, ref)
        own = model.encode_vision(other, grid, torch.tensor([0, 1, 2]))  # every frame its own reference
        own_before = model.encode_vision(pixels, grid, torch.tensor([0, 1, 2]))
    assert not torch.allclose(with_ref, plain)
    assert not torch.allclose(changed[4:], with_ref[4:])  # the fast frames' tokens see the slow frame
    torch.testing.assert_close(own[4:], own_before[4:])  # ... and only through the reference
    with pytest.raises(ValueError, match="reference frames"):
        model.encode_vision(pixels, grid, torch.tensor([0, 0]))


def test_temporal_branch_leaves_the_seeded_init_of_the_vision_side_alone():
    from keye.configuration import KeyeProjectorConfig
    from keye.modeling import KeyeForConditionalGeneration
    from keye.training.testing import tiny_config

    states = []
    for width in (0, 16):
        torch.manual_seed(0)
        model = KeyeForConditionalGeneration(
            tiny_config(projector_config=KeyeProjectorConfig(temporal_hidden_size=width))
        )
        states.append(model.state_dict())
    plain, branched = states
    assert set(branched) - set(plain) == {
        f"projector.temporal.{k}" for k in ("norm.weight", "norm.bias", "linear_1.weight", "linear_1.bias",
                                            "linear_2.weight", "linear_2.bias")
    }  # fmt: skip
    vision_side = [k for k in plain if k.startswith(("vision.", "projector."))]
    assert vision_side and all(torch.equal(plain[k], branched[k]) for k in vision_side)
