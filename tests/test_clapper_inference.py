"""Clapper wired into inference: the compressed prompt's tokens, markers and M-RoPE positions, generation against the
equivalent embeddings, the untrained fallback's pooled tokens, and the seams (chat, eval predictor, CLI choices)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import true_runs
from keye.chat import ChatSession
from keye.compression import COMPRESSIONS, clapper_inputs, compress_inputs
from keye.configuration import KeyeConfig
from keye.encoders.clapper import ClapperConfig, clapper_tokens
from keye.modeling import KeyeForConditionalGeneration
from keye.processing import KeyeProcessor
from keye.training.testing import make_tiny_model_folder

# 4 queries (a 2x2 grid): fewer tokens than the 3 frames they stand for at keye-tiny's frame sizes
SMALL = ClapperConfig(llm_width=64, hidden_size=16, heads=2, queries=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny model (keye-tiny's processor) without a Clapper, and the same model with a 'trained' one."""
    folder = make_tiny_model_folder(tmp_path_factory.mktemp("clapper") / "model")
    processor = KeyeProcessor.from_pretrained(folder)
    config = KeyeConfig.from_pretrained(folder)
    torch.manual_seed(0)
    plain = KeyeForConditionalGeneration(config).eval()
    config = KeyeConfig.from_pretrained(folder)
    config.clapper_config = SMALL.to_dict()
    torch.manual_seed(0)
    with_clapper = KeyeForConditionalGeneration(config).eval()
    with torch.no_grad():  # away from the identity init, as after training
        with_clapper.clapper.out_proj.weight.normal_(std=0.5)
    return plain, with_clapper, processor


def _prompt(processor, video, text="What is shown?"):
    return processor([{"role": "user", "content": [{"type": "video", "video": str(video)},
                                                   {"type": "text", "text": text}]}])  # fmt: skip


@pytest.mark.parametrize("which", ["untrained", "trained"])
def test_prompt_tokens_markers_and_positions(tiny, sample_video, which):
    plain, with_clapper, processor = tiny
    model = plain if which == "untrained" else with_clapper
    full = _prompt(processor, sample_video)
    out, (result,) = clapper_inputs(model, full)
    video = full.videos[0]
    cfg = model.clapper.config if model.clapper is not None else ClapperConfig(llm_width=64)
    grids = [(h // 2, w // 2) for _, h, w in full["video_grid_thw"].tolist()]
    ids, vid = out["input_ids"][0], model.config.video_token_id

    # one chunk per segment keyframe and one per segment query grid, in frame order
    n = clapper_tokens(grids, cfg)
    assert out["video_embeds"].shape == (n, 64) and int((ids == vid).sum()) == n
    assert "pixel_values_videos" not in out and out["position_ids"].shape == (3, 1, ids.shape[0])
    qh, qw = (2, 2) if which == "trained" else (6, 8)
    expected = []
    for s in range(0, len(grids), cfg.segment):
        expected.append((s, -(-grids[s][0] // 2), -(-grids[s][1] // 2)))
        if s + 1 < len(grids):
            expected.append((s + 1, qh, qw))
    assert result.grids == expected
    runs = true_runs(ids == vid)
    assert [e - s for s, e in runs] == [h * w for _, h, w in result.grids]

    # each chunk keeps the markers of the frame it is dated to; folded frames lose theirs; text outside is unchanged
    text = processor.tokenizer.decode(ids, skip_special_tokens=False)
    stamps = re.findall(r"<\|frame\|>([\d.]+)", text)
    assert stamps == [f"{video.times[k]:.1f}" for k, _, _ in result.grids]
    fast = [video.kinds[k] == "fast" for k, _, _ in result.grids]
    assert text.count("<|fast_start|>") == text.count("<|fast_end|>") == sum(fast)
    for (_, e), is_fast in zip(runs, fast):
        assert (processor.tokenizer.convert_ids_to_tokens(int(ids[e])) == "<|fast_end|>") == is_fast
    vs, ve = model.config.vision_start_token_id, model.config.vision_end_token_id
    fids = full["input_ids"][0]
    f_start, f_end = int((fids == vs).nonzero()), int((fids == ve).nonzero())
    o_start, o_end = int((ids == vs).nonzero()), int((ids == ve).nonzero())
    assert torch.equal(ids[: o_start + 1], fids[: f_start + 1]) and torch.equal(ids[o_end:], fids[f_end:])

    # M-RoPE: text advances all axes from the largest index so far; each chunk is an image grid at its frame's time
    pos = out["position_ids"][:, 0]
    chunk_of = {s: i for i, (s, _) in enumerate(runs)}
    i, largest, origin = 0, -1, None
    while i < ids.shape[0]:
        if i not in chunk_of:
            assert pos[:, i].tolist() == [largest + 1] * 3
            largest += 1
            i += 1
            continue
        k, h, w = result.grids[chunk_of[i]]
        start = largest + 1
        block = pos[:, i : i + h * w]
        rows = torch.arange(h).repeat_interleave(w) + start
        cols = torch.arange(w).repeat(h) + start
        assert torch.equal(block[1], rows) and torch.equal(block[2], cols)
        if origin is None:
            origin = (start, video.times[k])
        assert (
            block[0] == origin[0] + round((video.times[k] - origin[1]) * 2.0)
        ).all()  # tokens_per_second 2
        largest = int(block.max())
        i += h * w


def test_untrained_clapper_gives_pooled_tokens_and_warns_once(tiny, sample_video, caplog):
    import copy

    plain = copy.deepcopy(tiny[0])  # a model nothing has compressed with yet: its warning is still to come
    processor = tiny[2]
    full = _prompt(processor, sample_video)
    with caplog.at_level(logging.WARNING, logger="keye.compression"):
        out, (result,) = clapper_inputs(plain, full)
        clapper_inputs(plain, full)
    assert sum("no trained Clapper" in r.message for r in caplog.records) == 1  # once per model
    assert plain.clapper is None  # the stand-in is not added to the model (its checkpoint stays as it was)
    with torch.no_grad():
        tokens = plain.encode_vision(full["pixel_values_videos"], full["video_grid_thw"])  # (N, 64)
    grids = [(h // 2, w // 2) for _, h, w in full["video_grid_thw"].tolist()]
    frames = [f.t().reshape(1, 64, h, w) for f, (h, w) in zip(tokens.split([h * w for h, w in grids]), grids)]
    expected = []
    for s in range(0, len(frames), 4):
        expected.append(F.avg_pool2d(frames[s], 2, 2, ceil_mode=True).flatten(2)[0].t())
        rest = frames[s + 1 : s + 4]
        if rest:
            expected.append(
                torch.stack([F.adaptive_avg_pool2d(f, (6, 8)).flatten(2)[0].t() for f in rest]).mean(0)
            )
    torch.testing.assert_close(out["video_embeds"], torch.cat(expected))


def test_generation_matches_the_equivalent_embeddings(tiny, sample_video):
    _, model, processor = tiny
    full = _prompt(processor, sample_video)
    out, n = compress_inputs(model, full, "clapper")
    assert n < int((full["input_ids"] == model.config.video_token_id).sum())  # 4 queries compress here
    with torch.no_grad():
        gen = model.generate(**out, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        # reference: the clapper's tokens computed by hand, written into the embeddings, greedy without a cache
        tokens = model.encode_vision(full["pixel_values_videos"], full["video_grid_thw"])
        grids = [(h // 2, w // 2) for _, h, w in full["video_grid_thw"].tolist()]
        clap = model.clapper(list(tokens.split([h * w for h, w in grids])), grids).tokens
        ids, pos = out["input_ids"], out["position_ids"]
        for _ in range(4):
            embeds = model.get_input_embeddings()(ids)
            embeds[ids == model.config.video_token_id] = clap
            logits = model(inputs_embeds=embeds, position_ids=pos, use_cache=False).logits
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            pos = torch.cat([pos, (pos.max() + 1).expand(3, 1, 1)], dim=2)
    assert gen.tolist() == ids.tolist()


def test_chat_and_eval_predictor_with_clapper(tiny, sample_video):
    from keye.eval.keye_predictor import KeyePredictor

    _, model, processor = tiny
    session = ChatSession(model, processor, compress="clapper")
    first = session.ask("What is shown?", videos=[str(sample_video)], max_new_tokens=4)
    plain = ChatSession(model, processor).ask("What is shown?", videos=[str(sample_video)], max_new_tokens=4)
    assert first.prompt_tokens < plain.prompt_tokens
    assert session.ask("And then?", max_new_tokens=4).num_tokens > 0

    # the predictor's cached video prefix + the question (positions shifted after the shorter video) is exactly the
    # whole prompt compressed at once
    predictor = KeyePredictor(model, processor, name="tiny")
    prepared = predictor.prepare_video(
        str(sample_video), fps=None, max_frames=None, token_budget=None, compress="clapper"
    )
    assert prepared.position_shift < 0
    seen = {}
    generate = model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return generate(**kwargs)

    model.generate = spy
    try:
        answer = predictor.answer(prepared, "What is shown?", max_new_tokens=4, think=False)
    finally:
        del model.generate
    x, _ = compress_inputs(model, _prompt(processor, sample_video), "clapper")
    assert torch.equal(seen["input_ids"], x["input_ids"]) and torch.equal(
        seen["position_ids"], x["position_ids"]
    )
    with torch.no_grad():
        gen = model.generate(**x, max_new_tokens=4, do_sample=False)
    assert answer.text == processor.decode(gen[0, x["input_ids"].shape[1] :]).strip()


def test_dyntok_positions_stay_a_subset_of_the_full_layout(tiny, sample_video):
    plain, _, processor = tiny
    full = _prompt(processor, sample_video)
    out, n = compress_inputs(plain, full, "dyntok")
    kept = out["position_ids"][:, 0].T.tolist()
    cols = iter(full["position_ids"][:, 0].T.tolist())
    assert all(c in cols for c in kept) and out["video_embeds"].shape[0] == n


def test_every_entry_point_offers_clapper(tiny, sample_video, tmp_path, capsys):
    from keye.cli import build_parser, main
    from keye.encoders.slowfast import plan_video
    from keye.eval.runner import COMPRESS

    assert "clapper" in COMPRESSIONS and tuple(COMPRESS) == COMPRESSIONS
    parser = build_parser()
    for cmd in (["chat"], ["frames", "x.mp4"]):
        assert parser.parse_args([*cmd, "--compress", "clapper"]).compress == "clapper"
    # `keye frames --compress clapper` reports the TimePerceiver's token count
    _, model, processor = tiny
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    assert (
        main(["frames", str(sample_video), "--json", "--compress", "clapper", "--model", str(tmp_path / "m")])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    _, frames = plan_video(str(sample_video), processor.settings.video_config())  # that model's plan
    expected = clapper_tokens([(f.shape[0] // 28, f.shape[1] // 28) for f in frames], SMALL)
    assert report["compress"] == "clapper"
    assert report["tokens_after_compression"] == expected < report["total_tokens"]
