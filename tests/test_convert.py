"""Official Keye-VL-1.5 checkpoint layout: every key maps both ways and logits survive a round trip."""

from __future__ import annotations

import json
import re

import torch
from safetensors.torch import load_file

from conftest import run_keye, tiny_config

# The official names (REFERENCE.md), as patterns over a tiny random model with the same structure.
KEYE_PATTERNS = [
    r"visual\.vision_model\.embeddings\.(patch_embedding|position_embedding|packing_position_embedding)\.(weight|bias)",
    r"visual\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q|k|v|out)_proj\.(weight|bias)",
    r"visual\.vision_model\.encoder\.layers\.\d+\.(layer_norm1|layer_norm2)\.(weight|bias)",
    r"visual\.vision_model\.encoder\.layers\.\d+\.mlp\.(fc1|fc2)\.(weight|bias)",
    r"visual\.vision_model\.post_layernorm\.(weight|bias)",
    r"mlp_AR\.(pre_norm|linear_1|linear_2)\.(weight|bias)",
    r"model\.embed_tokens\.weight",
    r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight",
    r"model\.layers\.\d+\.self_attn\.(q|k)_norm\.weight",
    r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight",
    r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    r"model\.norm\.weight",
    r"lm_head\.weight",
]


def test_keye_layout_round_trip(tmp_path):
    from keye import KeyeForConditionalGeneration
    from keye.modeling import KeyeForConditionalGeneration as M

    torch.manual_seed(0)
    model = M(tiny_config(qk_norm=True, tie=False, packing=64, tps=None)).eval()
    model.save_pretrained(tmp_path / "ours")

    r = run_keye("convert", "--to-keye", str(tmp_path / "ours"), "--out", str(tmp_path / "official"))
    assert r.returncode == 0, r.stderr
    official = load_file(str(tmp_path / "official" / "model.safetensors"))
    unmatched = [k for k in official if not any(re.fullmatch(p, k) for p in KEYE_PATTERNS)]
    assert not unmatched, unmatched
    for p in KEYE_PATTERNS:  # every official family is present
        assert any(re.fullmatch(p, k) for k in official), p
    assert len(official) == len(model.state_dict())
    cfg = json.loads((tmp_path / "official" / "config.json").read_text())
    assert cfg["rope_scaling"]["mrope_section"] == model.config.text.mrope_section
    assert cfg["image_token_id"] == model.config.image_token_id

    # The official checkpoint also ships the unused SigLIP pooling head: it is dropped with a report.
    official["visual.vision_model.head.probe"] = torch.zeros(1, 1, 32)
    from safetensors.torch import save_file

    save_file(official, str(tmp_path / "official" / "model.safetensors"))
    r = run_keye("convert", "--from-keye", str(tmp_path / "official"), "--out", str(tmp_path / "back"))
    assert r.returncode == 0, r.stderr
    assert "dropped 1" in r.stdout

    back = KeyeForConditionalGeneration.from_pretrained(tmp_path / "back").eval()
    assert back.config.tokens_per_second is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k
    ids = torch.randint(0, 200, (1, 12))
    ids[0, 2:6] = model.config.image_token_id
    inputs = dict(
        input_ids=ids,
        pixel_values=torch.randn(16, 588),
        image_grid_thw=torch.tensor([[1, 4, 4]]),
        position_ids=torch.arange(12)[None, None].expand(3, 1, -1),
    )
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, back(**inputs).logits)


def test_from_keye_rejects_a_mismatched_checkpoint(tmp_path):
    from keye.convert import from_keye, to_keye
    from keye.modeling import KeyeForConditionalGeneration as M

    M(tiny_config()).save_pretrained(tmp_path / "ours")
    to_keye(tmp_path / "ours", tmp_path / "official")
    state = load_file(str(tmp_path / "official" / "model.safetensors"))
    del state["mlp_AR.linear_1.weight"]
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "official" / "model.safetensors"))
    try:
        from_keye(tmp_path / "official", tmp_path / "back")
    except ValueError as e:
        assert "projector.linear_1.weight" in str(e)
    else:
        raise AssertionError("missing tensor not reported")
