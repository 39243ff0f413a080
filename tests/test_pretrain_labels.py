"""keye-tiny Stage 0 (keye.pretrain.labels): dense labels agree with the rendered pixels, and a few steps of the
vision tower on them lower the loss."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from keye.pretrain.label_examples import collate, prepare_examples, token_targets
from keye.pretrain.labels import LabelHeads, WordTargets, _forward, _loss
from keye.synthetic import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    VideoSpec,
    generate_dataset,
    make_video_spec,
    object_masks,
    render_video_frames,
)

ROOT = Path(__file__).resolve().parents[1]


def test_object_masks_cover_exactly_the_object_pixels():
    spec = make_video_spec(3, index=5, max_objects=3, text_prob=0.0)
    frames = list(render_video_frames(spec))
    for f in (0, len(frames) // 2, len(frames) - 1):
        scene, masks = object_masks(spec, f)
        assert masks.shape == (len(scene.objects), *spec.size)
        for k, obj in enumerate(scene.objects):
            inside = frames[f][masks[k] > 0.99].astype(float)
            assert len(inside) > 20
            np.testing.assert_allclose(inside.mean(0), COLOURS[obj.colour], atol=3)
        outside = frames[f][masks.sum(0) == 0].astype(float)
        bg = np.asarray(BACKGROUNDS[scene.background][0], float)
        assert np.abs(outside - bg).max(1).mean() < 40  # the background gradient, no object colour


def test_token_targets_of_a_known_layout():
    # One red square (20 px) centred in the top-left 28x28 cell of a 112x112 frame; one blue star in the bottom-right.
    objs = [
        SceneObject("square", "red", 20, (14.0, 14.0), (14.0, 14.0)),
        SceneObject("star", "blue", 20, (98.0, 98.0), (98.0, 98.0)),
    ]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, None, None, None)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    colours, shapes = list(COLOURS), list(SHAPES)
    nc = len(colours)
    multi = t["multi"].view(4, 4, -1)
    assert multi[0, 0, colours.index("red")] == 1 and multi[0, 0, nc + shapes.index("square")] == 1
    assert multi[3, 3, colours.index("blue")] == 1 and multi[3, 3, nc + shapes.index("star")] == 1
    assert multi[0, 0].sum() == 3 and multi[3, 3].sum() == 3  # colour, shape, pair
    assert multi.sum() == 6  # nothing elsewhere
    assert (t["background"] == list(BACKGROUNDS).index("navy")).all() and int(t["count"]) == 2
    # A fast frame's 2x2 grid: the same objects, coarser cells.
    coarse = token_targets(spec, 0, (2, 2), min_share=0.2)["multi"].view(2, 2, -1)
    assert coarse[0, 0, colours.index("red")] == 1 and coarse[1, 1, colours.index("blue")] == 1
    assert coarse[0, 1].sum() == 0 and coarse[1, 0].sum() == 0


def _media(root, kind: str, n: int) -> None:
    """``n`` generated media of one kind under ``root/<kind>`` (seed 7, keye-tiny's two-shape regime)."""
    generate_dataset(
        root / kind,
        seed=7,
        n=n,
        kinds=(kind,),
        per_sample="all",
        max_objects=2,
        text_prob=0.0,
        progress=False,
    )


def test_a_few_steps_on_the_labels_lower_the_loss(tmp_path):
    from keye.pretrained import load_pretrained

    for kind, n in (("video", 3), ("image", 3)):
        _media(tmp_path, kind, n)
    model, processor = load_pretrained("keye-tiny")
    examples = prepare_examples(tmp_path, processor, min_share=0.2)
    assert len(examples) == 6
    for e in examples:  # one target row per merged token, one count per frame
        assert e["multi"].shape[0] == int((e["grid_thw"][:, 1] * e["grid_thw"][:, 2]).sum()) // 4
        assert e["count"].shape[0] == e["grid_thw"].shape[0]
    torch.manual_seed(0)
    heads = LabelHeads(4 * model.config.vision.hidden_size)
    targets = WordTargets(model, processor.tokenizer)
    params = [*model.vision.parameters(), *model.projector.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=3e-3)
    batch = collate(examples)
    losses = []
    for _ in range(8):
        loss = _loss(_forward(model, heads, batch), batch, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_word_targets_are_the_label_words_embeddings():
    from keye.pretrained import load_pretrained

    model, processor = load_pretrained("keye-tiny")
    targets = WordTargets(model, processor.tokenizer)
    objs = [SceneObject("square", "red", 20, (14.0, 14.0), (14.0, 14.0))]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, None, None, None)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    got = targets({"multi": t["multi"], "background": t["background"]})
    table = model.get_input_embeddings().weight.detach().float()

    def word(w):
        return table[processor.tokenizer.encode(w, add_special_tokens=False)].mean(0)

    torch.testing.assert_close(got[0], (word("red") + word("square")) / 2)  # the square's token
    torch.testing.assert_close(got[5], word("navy"))  # a background token


def test_word_readout_of_exact_targets_is_perfect_and_of_swapped_shapes_is_not():
    from keye.pretrain.label_examples import label_vocab
    from keye.pretrain.labels import word_readout
    from keye.pretrained import load_pretrained

    model, processor = load_pretrained("keye-tiny")
    targets = WordTargets(model, processor.tokenizer)
    colours, shapes, pairs, _ = label_vocab()
    nc, ns = len(colours), len(shapes)
    multi = torch.zeros(nc * ns, nc + ns + len(pairs))
    for k in range(nc * ns):  # every colour-shape pair once
        multi[k, k // ns] = multi[k, nc + k % ns] = 1
    exact = targets({"multi": multi, "background": torch.zeros(nc * ns, dtype=torch.long)})
    assert word_readout(exact, multi, targets, nc) == {"word_colour": 1.0, "word_shape": 1.0}
    swapped = multi.clone()
    swapped[:, nc : nc + ns] = multi[:, nc : nc + ns].roll(1, dims=1)  # tokens that look like the next shape
    readout = word_readout(
        targets({"multi": swapped, "background": torch.zeros(nc * ns, dtype=torch.long)}), multi, targets, nc
    )
    assert readout == {"word_colour": 1.0, "word_shape": 0.0}


def test_position_targets_say_where_each_token_is():
    from keye.pretrain.label_examples import token_xy
    from keye.pretrain.labels import word_readout
    from keye.pretrained import load_pretrained

    xy = token_xy(torch.tensor([[1, 4, 4], [1, 2, 6]]))  # a 2x2-token frame, then a 1x3-token frame
    torch.testing.assert_close(xy[:4], torch.tensor([[-0.5, -0.5], [0.5, -0.5], [-0.5, 0.5], [0.5, 0.5]]))
    torch.testing.assert_close(xy[4:], torch.tensor([[-2 / 3, 0.0], [0.0, 0.0], [2 / 3, 0.0]]))

    model, processor = load_pretrained("keye-tiny")
    plain = WordTargets(model, processor.tokenizer)
    placed = WordTargets(model, processor.tokenizer, position=0.5)
    objs = [SceneObject("square", "red", 20, (14.0, 14.0), (14.0, 14.0))]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, None, None, None)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    batch = {"multi": t["multi"], "background": t["background"], "grid_thw": torch.tensor([[1, 8, 8]])}
    shift = placed(batch) - plain(batch)
    table = model.get_input_embeddings().weight.detach().float()

    def word(w):
        return table[processor.tokenizer.encode(w, add_special_tokens=False)].mean(0)

    right = torch.nn.functional.cosine_similarity(shift, (word("right") - word("left"))[None], dim=-1)
    assert right[3] > 0.5 and right[0] < -0.5  # top-right token leans to "right", top-left to "left"
    # half a mean word norm per unit of x or y: the corner token (-0.75, -0.75) moves by 0.5 * 0.75 * sqrt(2)
    torch.testing.assert_close(shift[0].norm(), 0.5 * 0.75 * 2**0.5 * plain.objects.norm(dim=-1).mean())
    nc = len(COLOURS)
    one = t["multi"][:, :nc].sum(1) == 1  # the colour still reads right at this weight
    assert word_readout(placed(batch)[one], t["multi"][one], placed, nc)["word_colour"] == 1.0

    # with token_targets' xy, an object token says where its object is, not where the token is
    objs = [SceneObject("square", "red", 20, (20.0, 14.0), (20.0, 14.0))]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, None, None, None)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    assert t["multi"][:, :nc].sum(1).tolist() == [1] + [0] * 15  # only the top-left token shows the square
    torch.testing.assert_close(t["xy"][0], torch.tensor([20 / 56 - 1, 14 / 56 - 1]), atol=0.01, rtol=0)
    torch.testing.assert_close(t["xy"][1:], token_xy(torch.tensor([[1, 8, 8]]))[1:])
    batch = {**batch, "multi": t["multi"], "xy": t["xy"]}
    one = t["multi"][:, :nc].sum(1) == 1
    assert word_readout(placed(batch)[one], t["multi"][one], placed, nc)["word_colour"] == 1.0


def test_frame_motion_needs_a_reference_in_the_same_moving_scene():
    from keye.pretrain.label_examples import frame_motion
    from keye.synthetic import DIRECTIONS

    moving = [SceneObject("square", "red", 20, (30.0, 50.0), (80.0, 50.0))]
    still = [SceneObject("star", "blue", 20, (50.0, 50.0), (50.0, 50.0))]
    spec = VideoSpec(
        (112, 112),
        8.0,
        16,
        [
            Scene(0, 8, "navy", moving, "right", None, None, None),
            Scene(8, 16, "ivory", still, None, None, None, None),
        ],
    )
    # frame 0: no reference; 4 -> 0 same moving scene; 8 -> 4 across the cut; 12 -> 8 same scene, but still
    assert frame_motion(spec, [0, 4, 8, 12], [0, 0, 1, 2]) == [-1, DIRECTIONS.index("right"), -1, -1]


def test_motion_targets_add_the_direction_word():
    from keye.pretrained import load_pretrained
    from keye.synthetic import DIRECTIONS

    model, processor = load_pretrained("keye-tiny")
    targets = WordTargets(model, processor.tokenizer, motion=True)
    objs = [SceneObject("square", "red", 20, (14.0, 14.0), (14.0, 14.0))]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, "up", None, None, None)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    up = DIRECTIONS.index("up")
    got = targets({"multi": t["multi"], "background": t["background"], "motion": torch.full((16,), up)})
    still = targets({"multi": t["multi"], "background": t["background"], "motion": torch.full((16,), -1)})
    table = model.get_input_embeddings().weight.detach().float()

    def word(w):
        return table[processor.tokenizer.encode(w, add_special_tokens=False)].mean(0)

    torch.testing.assert_close(got[0], (word("red") + word("square") + word("up")) / 3)
    torch.testing.assert_close(got[5], (word("navy") + word("up")) / 2)
    torch.testing.assert_close(still[0], (word("red") + word("square")) / 2)


def _phase(tmp_path, shipped: str, *overrides: str):
    """A Stage 0 phase as its shipped YAML configures it, on ``tmp_path``'s media, a few fast steps."""
    from keye.pretrain.labels import LabelsConfig, LabelTrainer
    from keye.training import load_config

    path = ROOT / "configs" / "pretrain" / f"{shipped}.yaml"
    common = [
        f"output_dir={tmp_path / 'run'}",
        f"labels.data={tmp_path}",
        "model.init_from=[]",
        "save_every=100",
    ]
    return LabelTrainer(load_config(path, [*common, *overrides], cls=LabelsConfig)).setup()


def test_the_label_phases_train_tower_projector_and_heads_and_lower_the_loss(tmp_path):
    _media(tmp_path, "video", 2)
    _media(tmp_path, "image", 3)
    _media(tmp_path / "stage0", "image", 4)
    trainer = _phase(
        tmp_path,
        "stage0_tiny",
        f"labels.images={tmp_path / 'stage0'}",
        "labels.image_steps=6",
        "labels.batch=4",
        "labels.held_out=1",
        "max_steps=10",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
    )
    model = trainer._unwrapped()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [m["loss"] for m in trainer.train()]
    assert len(losses) == 10 and sum(losses[3:6]) < 0.8 * sum(losses[:3]), losses  # on the still images
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"vision", "projector", "head"}
    final = trainer.export()
    scores = json.loads((final / "eval.json").read_text())
    assert {"token_shapes", "word_colour", "word_position"} <= set(scores)
    from safetensors.torch import load_file

    delta = load_file(str(final / "weights.safetensors"))  # what the later stages' init_from reads: no head
    assert {k.split(".")[0] for k in delta} == {"vision", "projector"}
    assert (final / "head.safetensors").exists()


def test_the_motion_phase_trains_the_projector_alone_and_lowers_its_loss(tmp_path):
    from keye.pretrained import load_pretrained

    _media(tmp_path, "video", 4)
    _, processor = load_pretrained("keye-tiny")
    examples = prepare_examples(tmp_path, processor, min_share=0.2)
    assert any((e["motion"] >= 0).any() for e in examples)  # some frame shows its scene moving
    assert all(len(e["reference"]) == len(e["motion"]) == e["grid_thw"].shape[0] for e in examples)
    trainer = _phase(
        tmp_path,
        "stage0_motion_tiny",
        "model.path=keye-tiny",
        "labels.batch=4",
        "labels.held_out=0",
        "max_steps=12",
        "optim.lr=3e-3",
        "optim.warmup_steps=1",
        "mixed_precision='no'",
    )
    model = trainer._unwrapped()
    tower = {k: v.clone() for k, v in model.vision.state_dict().items()}
    branch = model.projector.temporal.linear_2.weight.detach().clone()
    losses = [m["loss"] for m in trainer.train()]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in tower.items())  # the tower is frozen
    assert not torch.equal(model.projector.temporal.linear_2.weight, branch)
    assert not hasattr(model, "head")  # no label heads in the motion phase


def test_a_resumed_label_phase_draws_the_same_media(tmp_path):
    """The media of a step come from the data position (not a generator's running state): a resumed run draws
    exactly what the uninterrupted one drew."""
    _media(tmp_path, "image", 5)
    args = (
        "labels.image_steps=0",
        "labels.images=null",
        "labels.batch=3",
        "labels.held_out=0",
        "max_steps=4",
    )
    full = _phase(tmp_path, "stage0_tiny", *args)
    drawn = [b["pixel_values"].clone() for _, b in zip(range(4), full.micro_batches())]
    later = _phase(tmp_path, "stage0_tiny", *args)
    later.position = 2
    assert not torch.equal(drawn[0], drawn[1])  # the draws differ from step to step
    assert all(torch.equal(a, b["pixel_values"]) for a, b in zip(drawn[2:], later.micro_batches()))


def test_tokens_on_the_on_screen_text_learn_its_word():
    """A token holding a share of the text's box is labelled with the text (the head's class and, in the projector's
    target, the word itself: alone on a token without shapes, beside the shapes' words on one with them)."""
    from keye.pretrain.label_examples import text_vocab
    from keye.pretrained import load_pretrained

    objs = [SceneObject("square", "red", 20, (42.0, 98.0), (42.0, 98.0))]  # under the text's left half
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, "key", (40, 88, 72, 108), 20)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    text = t["text"].view(4, 4)
    assert text[3, 1] == text[3, 2] == text_vocab().index("key")
    assert (text >= 0).sum() == 2  # nowhere else
    model, processor = load_pretrained("keye-tiny")
    got = WordTargets(model, processor.tokenizer)(t)
    table = model.get_input_embeddings().weight.detach().float()

    def word(w):
        return table[processor.tokenizer.encode(w, add_special_tokens=False)].mean(0)

    torch.testing.assert_close(got[3 * 4 + 2], word("key"))
    torch.testing.assert_close(got[3 * 4 + 1], (word("red") + word("square") + word("key")) / 3)
    torch.testing.assert_close(got[0], word("navy"))


def test_background_tokens_learn_their_frames_count():
    """With ``count`` a frame's background tokens also hold its count word ("two"), its object and text tokens do not;
    the readout loss is low when every background token is its target and high when they say another count."""
    from keye.pretrain.labels import _count_labels, _readout_loss
    from keye.pretrained import load_pretrained

    objs = [
        SceneObject("square", "red", 20, (14.0, 14.0), (14.0, 14.0)),
        SceneObject("star", "blue", 20, (98.0, 14.0), (98.0, 14.0)),
    ]
    spec = VideoSpec((112, 112), 8.0, 4, [Scene(0, 4, "navy", objs, None, "key", (40, 88, 72, 108), 20)])
    t = token_targets(spec, 0, (4, 4), min_share=0.2)
    batch = {**t, "count": t["count"][None], "frame_of": torch.zeros(16, dtype=torch.long)}
    model, processor = load_pretrained("keye-tiny")
    counted = WordTargets(model, processor.tokenizer, count=True)
    plain = WordTargets(model, processor.tokenizer)
    table = model.get_input_embeddings().weight.detach().float()

    def word(w):
        return table[processor.tokenizer.encode(w, add_special_tokens=False)].mean(0)

    got, before = counted(batch), plain(batch)
    labels = _count_labels(batch)
    background = [5, 6, 9, 10]  # the middle: no shape, no text
    assert (labels[background] == 2).all() and labels[0] == labels[3] == labels[14] == -1
    assert set(labels.tolist()) == {-1, 2}
    torch.testing.assert_close(got[5], (word("navy") + word("two")) / 2)
    on = labels < 0  # the shapes' and the text's tokens are unchanged
    torch.testing.assert_close(got[on], before[on])
    right = _readout_loss(got, labels, counted.counts)
    wrong = _readout_loss(torch.where((labels >= 0)[:, None], word("four"), got), labels, counted.counts)
    assert right < 1.0 < wrong


def test_a_counting_label_phase_reads_out_the_count_and_trains_on_more_folders(tmp_path):
    """Stage 4 as shipped (``count``, ``also``): the media of ``also`` join the training ones, the held-out report
    scores the background tokens' count word."""
    _media(tmp_path, "image", 3)
    _media(tmp_path / "more", "image", 2)
    trainer = _phase(
        tmp_path,
        "stage4_tiny",
        f"labels.also=[{tmp_path / 'more'}]",
        "labels.image_steps=0",
        "labels.images=null",
        "labels.batch=2",
        "labels.held_out=1",
        "max_steps=2",
    )
    assert len(trainer.stream["train"]) == 2 + 2 and trainer.targets.count
    assert len([m["loss"] for m in trainer.train()]) == 2
    scores = json.loads((trainer.export() / "eval.json").read_text())
    assert 0 <= scores["word_count"] <= 100
