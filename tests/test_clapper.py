"""Clapper TimePerceiver: shapes, token counts, the untrained (pooled) output, gradients, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from keye.encoders.clapper import ClapperConfig, TimePerceiver, clapper_tokens, query_grid

TINY = ClapperConfig(llm_width=32, hidden_size=16, heads=4, queries=12)


def _frames(grids, width=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(h * w, width, generator=g) for h, w in grids]


def test_shapes_and_token_counts():
    torch.manual_seed(0)
    model = TimePerceiver(TINY)
    grids = [(6, 8)] + [(4, 4)] * 3 + [(6, 8)] + [(4, 4)] * 3 + [(5, 7), (3, 3)]  # 2 full segments + 2 frames
    out = model(_frames(grids), grids)
    # keyframes pooled 2x2 (ceil): 6x8 -> 3x4, 5x7 -> 3x4; every segment with other frames adds 12 queries
    assert out.tokens_per_segment == [12 + 12, 12 + 12, 12 + 12]
    assert out.tokens.shape == (72, 32)
    assert clapper_tokens(grids, TINY) == 72
    assert out.grids == [(0, 3, 4), (1, 3, 4), (4, 3, 4), (5, 3, 4), (8, 3, 4), (9, 3, 4)]
    assert query_grid(12) == (3, 4) and query_grid(48) == (6, 8) and query_grid(7) == (1, 7)


def test_tokens_per_frame_at_keye_sizes():
    cfg = ClapperConfig()
    # 768-token slow keyframes (24 x 32) and 230-token fast frames: 192 + 48 per 4 frames
    grids = [(24, 32), (12, 19), (12, 19), (12, 19)] * 24  # 96 frames
    assert clapper_tokens(grids, cfg) / len(grids) == 60.0
    # the paper's setting: 784-token frames (28 x 28) -> 196 + 48 per 4 frames = 61 per frame
    assert clapper_tokens([(28, 28)] * 96, cfg) / 96 == 61.0
    assert clapper_tokens([(28, 28)] * 96, cfg) < 6000


def test_untrained_output_is_pooled_tokens():
    torch.manual_seed(0)
    model = TimePerceiver(TINY)
    grids = [(4, 6), (6, 8), (6, 8), (6, 8)]
    frames = _frames(grids, seed=1)
    out = model(frames, grids)
    key = F.avg_pool2d(frames[0].t().reshape(1, 32, 4, 6), 2, 2, ceil_mode=True).flatten(2)[0].t()
    torch.testing.assert_close(out.tokens[:6], key)
    pooled = torch.stack(
        [F.adaptive_avg_pool2d(f.t().reshape(1, 32, 6, 8), (3, 4)).flatten(2)[0].t() for f in frames[1:]]
    ).mean(0)
    torch.testing.assert_close(out.tokens[6:], pooled)


def test_gradients_flow():
    torch.manual_seed(0)
    model = TimePerceiver(TINY)
    grids = [(4, 4)] * 8
    frames = [f.requires_grad_() for f in _frames(grids)]
    target = torch.randn(clapper_tokens(grids, TINY), 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.mse_loss(model(frames, grids).tokens, target)
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in frames)  # through pooling and attention
    assert model.out_proj.weight.grad.abs().sum() > 0  # zero-initialised output: only it moves on step one
    opt.step()
    opt.zero_grad()
    loss2 = F.mse_loss(model(frames, grids).tokens, target)
    loss2.backward()
    assert loss2 < loss
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []  # after one step every parameter gets a gradient


def test_state_dict_round_trip_and_config():
    torch.manual_seed(0)
    model = TimePerceiver(TINY)
    torch.nn.init.normal_(model.out_proj.weight)  # a "trained" module: the attention path now matters
    clone = TimePerceiver(ClapperConfig.from_dict(TINY.to_dict()))
    clone.load_state_dict(model.state_dict())
    grids = [(4, 4)] * 5
    frames = _frames(grids)
    torch.testing.assert_close(clone(frames, grids).tokens, model(frames, grids).tokens)
    with pytest.raises(ValueError, match="unknown keys"):
        ClapperConfig.from_dict({**TINY.to_dict(), "bogus": 1})


def test_single_frame_and_checks():
    model = TimePerceiver(TINY)
    out = model(_frames([(3, 3)]), [(3, 3)])
    assert out.tokens.shape == (4, 32) and out.tokens_per_segment == [4]  # a lone keyframe: no queries
    with pytest.raises(ValueError, match="h \\* w tokens"):
        model(_frames([(3, 3)]), [(3, 4)])
