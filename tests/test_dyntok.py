"""DynTok: grouping by left-neighbour similarity, mean merging, the position rule."""

from __future__ import annotations

import pytest
import torch

from keye.encoders.dyntok import (
    DYNTOK_THRESHOLD,
    dyntok_frames,
    dyntok_groups,
    dyntok_keep_index,
    dyntok_merge,
    dyntok_positions,
)


def test_identical_patches_merge_each_row_into_one_token():
    h, w, d = 4, 7, 32
    feat = torch.randn(1, d).repeat(h * w, 1)  # (28, 32), every patch the same
    groups = dyntok_groups(feat, h, w)
    assert groups.tolist() == [r for r in range(h) for _ in range(w)]  # one group per row, never across rows
    tokens = torch.randn(h * w, 16)
    merged = dyntok_merge(tokens, groups)
    assert merged.shape == (h, 16)
    torch.testing.assert_close(merged, tokens.view(h, w, 16).mean(1))
    assert dyntok_positions(groups, h, w).tolist() == [[r, 0] for r in range(h)]


def test_random_noise_merges_nothing():
    torch.manual_seed(0)
    h, w = 6, 9
    feat = torch.randn(h * w, 256)  # independent: cosine about 0 +- 0.06
    groups = dyntok_groups(feat, h, w)
    assert groups.tolist() == list(range(h * w))
    tokens = torch.randn(h * w, 8)
    assert torch.equal(dyntok_merge(tokens, groups), tokens)
    pos = dyntok_positions(groups, h, w)
    assert pos.tolist() == [[r, c] for r in range(h) for c in range(w)]


def test_runs_threshold_and_positions():
    # one row of 6: a, a, b, b', c, a  with cos(b, b') = 0.8 and cos(a, b) = 0
    a, b, c = torch.eye(3)
    b2 = 0.8 * b + 0.6 * c  # unit, cos(b, b2) = 0.8, cos(b2, c) = 0.6 (not > 0.6)
    feat = torch.stack([a, a, b, b2, c, a])
    groups = dyntok_groups(feat, 1, 6)
    assert groups.tolist() == [0, 0, 1, 1, 2, 3]
    assert dyntok_groups(feat, 1, 6, threshold=0.9).tolist() == [0, 0, 1, 2, 3, 4]
    assert dyntok_groups(feat, 1, 6, threshold=0.5).tolist() == [0, 0, 1, 1, 1, 2]
    # position of a merged token: its group's first (leftmost) token; a subset of the grid, in raster order
    assert dyntok_positions(groups, 1, 6).tolist() == [[0, 0], [0, 2], [0, 4], [0, 5]]
    assert dyntok_keep_index(groups).tolist() == [0, 2, 4, 5]
    assert DYNTOK_THRESHOLD == 0.6


def test_merge_dtype_and_gradients():
    tokens = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    groups = torch.tensor([0, 0, 0, 1, 2, 2])
    merged = dyntok_merge(tokens, groups)
    assert merged.dtype == torch.bfloat16 and merged.shape == (3, 4)
    merged.float().sum().backward()
    expected = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1, 0.5, 0.5])
    torch.testing.assert_close(tokens.grad.float()[:, 0], expected, atol=2e-3, rtol=0)  # bf16 grads


def test_frames_of_different_sizes():
    torch.manual_seed(1)
    grids = [(2, 3), (4, 4), (1, 5)]  # a slow frame between fast ones, say
    flat = torch.randn(1, 16).repeat(6, 1)  # frame 0: flat -> 2 tokens (one per row)
    noisy = torch.randn(16, 16)  # frame 1: nothing merges
    half = torch.cat([torch.ones(3, 16), torch.randn(2, 16)])  # frame 2: 3 merge, then 2 distinct
    feats = torch.cat([flat, noisy, half])
    tokens = torch.randn(27, 8)
    out = dyntok_frames(feats, tokens, grids)
    assert out.tokens_per_frame == [2, 16, 3]
    assert out.tokens_before == 27 and out.tokens_after == 21
    assert out.kept_ratio == pytest.approx(21 / 27)
    assert out.positions[:2].tolist() == [[0, 0, 0], [0, 1, 0]]
    assert out.positions[-3:].tolist() == [[2, 0, 0], [2, 0, 3], [2, 0, 4]]
    assert out.keep_index.tolist()[:2] == [0, 3] and out.keep_index.tolist()[-3:] == [22, 25, 26]
    torch.testing.assert_close(out.tokens[-3], tokens[22:25].mean(0))
    with pytest.raises(ValueError, match="grids hold 27 tokens"):
        dyntok_frames(feats[:-1], tokens[:-1], grids)


def test_checks_shapes():
    with pytest.raises(ValueError, match=r"expected \(12, D\) features for a 3x4 grid"):
        dyntok_groups(torch.randn(10, 4), 3, 4)


def test_frames_in_one_pass_match_frame_by_frame():
    torch.manual_seed(2)
    grids = [(3, 5), (2, 2), (4, 3), (1, 1), (3, 5)]
    # smooth-ish features so that about half of the neighbours merge
    feats = torch.cat([torch.randn(1, 8) + 0.8 * torch.randn(h * w, 8) for h, w in grids])
    tokens = torch.randn(feats.shape[0], 6)
    out = dyntok_frames(feats, tokens, grids)
    merged, positions, keep, per_frame, offset = [], [], [], [], 0
    for t, (h, w) in enumerate(grids):
        f, x = feats[offset : offset + h * w], tokens[offset : offset + h * w]
        groups = dyntok_groups(f, h, w)
        merged.append(dyntok_merge(x, groups))
        hw = dyntok_positions(groups, h, w)
        positions.append(torch.cat([torch.full_like(hw[:, :1], t), hw], dim=1))
        keep.append(dyntok_keep_index(groups) + offset)
        per_frame.append(len(hw))
        offset += h * w
    assert 0 < out.tokens_after < out.tokens_before  # some merge, some do not
    assert out.tokens_per_frame == per_frame
    assert torch.equal(out.positions, torch.cat(positions)) and torch.equal(out.keep_index, torch.cat(keep))
    torch.testing.assert_close(out.tokens, torch.cat(merged))
