"""Stage 0's examples: each synthetic medium through the processor (as at inference, Slow-Fast sizes included), with
what every merged vision token should learn from it (`token_targets`): the colours, shapes and colour-shape pairs of
the objects covering it, the background, the on-screen text under it, where its content lies, the frame's count, and
the frame's motion since its reference frame (`frame_motion`). `cached_examples` keeps them beside the data.

Not for: the losses and the trainer that use them (`keye.pretrain.labels`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from keye.synthetic import DIRECTIONS

__all__ = [
    "COUNT_WORDS",
    "MAX_COUNT",
    "cached_examples",
    "collate",
    "frame_motion",
    "label_vocab",
    "prepare_examples",
    "text_vocab",
    "token_targets",
    "token_xy",
]

# a frame's count class, and the word its background tokens hold for it (`keye.pretrain.labels.WordTargets`)
COUNT_WORDS = ("zero", "one", "two", "three", "four")
MAX_COUNT = len(COUNT_WORDS) - 1  # more objects count as this many
_EXAMPLES_VERSION = 2  # 2: on-screen text targets


def label_vocab() -> tuple[list[str], list[str], list[str], list[str]]:
    """The label heads' classes: colours, shapes, colour-shape pairs ("red circle") and backgrounds."""
    from keye.synthetic import BACKGROUNDS, COLOURS, SHAPES

    colours, shapes = list(COLOURS), list(SHAPES)
    pairs = [f"{c} {s}" for c in colours for s in shapes]
    return colours, shapes, pairs, list(BACKGROUNDS)


def text_vocab() -> list[str]:
    """What on-screen text can say: the generator's words and digits."""
    from keye.synthetic import DIGITS, WORDS

    return [*WORDS, *DIGITS]


def token_xy(grid_thw: torch.Tensor) -> torch.Tensor:
    """Each merged token's centre in its frame, ``(T, 2)`` as ``(x, y)`` in (-1, 1) (frames in order, row-major)."""
    out = []
    for _, h, w in grid_thw.tolist():
        h, w = h // 2, w // 2
        y, x = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        out.append(torch.stack([x.flatten(), y.flatten()], 1) * 2 - 1)
    return torch.cat(out)


def token_targets(spec, frame: int, grid_hw: tuple[int, int], min_share: float) -> dict[str, torch.Tensor]:
    """Targets of one frame's merged tokens (row-major ``grid_hw``): ``multi`` (T, colours+shapes+pairs) 0/1,
    ``background`` (T,) and ``count`` () class ids, ``text`` (T,) the index in `text_vocab` of the on-screen text when
    the token holds at least ``min_share`` of its box (else -1), ``xy`` (T, 2) where the token's content lies in the frame (in
    (-1, 1)): the centre of the objects under it (weighted by their shares), else the token's own centre. An object's
    centre moves with it even inside one token, so motion shows in every frame, fast frames' 2x2 tokens included."""
    from keye.synthetic import object_masks

    colours, shapes, pairs, backgrounds = label_vocab()
    scene, masks = object_masks(spec, frame)
    # share of each object's pixels under each token
    cover = F.adaptive_avg_pool2d(torch.from_numpy(masks), grid_hw) * (masks.shape[1] * masks.shape[2])
    cover = cover / cover.sum(dim=(1, 2), keepdim=True).clamp(min=1e-6)
    present = (cover >= min_share).flatten(1).T  # (T, n_objects)
    n_tok = present.shape[0]
    multi = torch.zeros(n_tok, len(colours) + len(shapes) + len(pairs))
    for k, obj in enumerate(scene.objects):
        rows = present[:, k]
        multi[rows, colours.index(obj.colour)] = 1
        multi[rows, len(colours) + shapes.index(obj.shape)] = 1
        multi[rows, len(colours) + len(shapes) + pairs.index(f"{obj.colour} {obj.shape}")] = 1
    m = torch.from_numpy(masks)
    h, w = m.shape[1:]
    xs, ys = (torch.arange(w) + 0.5) / w * 2 - 1, (torch.arange(h) + 0.5) / h * 2 - 1
    area = m.sum(dim=(1, 2)).clamp(min=1e-6)
    centres = torch.stack([(m.sum(1) * xs).sum(1) / area, (m.sum(2) * ys).sum(1) / area], 1)  # (n_objects, 2)
    share = present.float() * cover.flatten(1).T  # (T, n_objects)
    under = share.sum(1, keepdim=True)
    own = token_xy(torch.tensor([[1, 2 * grid_hw[0], 2 * grid_hw[1]]]))
    text = torch.full((n_tok,), -1)
    if scene.text is not None and scene.text_box is not None:
        box = torch.zeros(1, h, w)
        x0, y0, x1, y1 = scene.text_box
        box[0, max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)] = 1
        text_cover = F.adaptive_avg_pool2d(box, grid_hw).flatten()
        text[text_cover / text_cover.sum().clamp(min=1e-6) >= min_share] = text_vocab().index(scene.text)
    return {
        "multi": multi,
        "background": torch.full((n_tok,), backgrounds.index(scene.background)),
        "text": text,
        "count": torch.tensor(min(len(scene.objects), MAX_COUNT)),
        "xy": torch.where(under > 0, share @ centres / under.clamp(min=1e-6), own),
    }


def frame_motion(spec, frames: list[int], reference: list[int]) -> list[int]:
    """Per sampled frame, the index in ``DIRECTIONS`` of the way its scene moves when its reference frame (a frame
    index into ``frames``) is another frame of the same moving scene, else -1: what the frame's tokens can show with
    the projector's temporal branch."""

    def scene(f: int) -> int:
        return next(k for k, sc in enumerate(spec.scenes) if sc.start_frame <= f < sc.end_frame)

    out = []
    for i, r in enumerate(reference):
        k = scene(frames[i])
        moving = r != i and scene(frames[r]) == k and spec.scenes[k].motion is not None
        out.append(DIRECTIONS.index(spec.scenes[k].motion) if moving else -1)
    return out


def prepare_examples(data: Path, processor, min_share: float) -> list[dict]:
    """One example per medium of ``data/{video,image}/samples.jsonl``: the processor's patches and grids, and the
    targets of every frame (video frames as Slow-Fast sampled them), each frame's reference frame (an image's: itself)
    and motion (`frame_motion`)."""
    from keye.synthetic import load_samples

    examples = []
    for kind in ("video", "image"):
        path = Path(data) / kind / "samples.jsonl"
        if not path.exists():
            continue
        samples = load_samples(path)
        for s in tqdm(samples, desc=f"stage 0 labels ({kind})", unit="sample"):
            if kind == "video":
                video = processor.load_video(s.media)
                frames = [f.index for f in video.plan.frames]
                inputs = processor([{"role": "user", "content": [{"type": "video", "video": video}]}])
                pix, grid = inputs["pixel_values_videos"], inputs["video_grid_thw"]
                reference = inputs["video_reference_index"].tolist()
            else:
                frames, reference = [0], [0]
                inputs = processor([{"role": "user", "content": [{"type": "image", "image": s.media}]}])
                pix, grid = inputs["pixel_values"], inputs["image_grid_thw"]
            if grid.shape[0] != len(frames):
                raise ValueError(f"{s.media}: {grid.shape[0]} grid rows for {len(frames)} frames")
            spec = s.spec
            targets = [
                token_targets(spec, f, (int(h) // 2, int(w) // 2), min_share)
                for f, (_, h, w) in zip(frames, grid.tolist())
            ]
            examples.append(
                {
                    "pixel_values": pix,
                    "grid_thw": grid,
                    "multi": torch.cat([t["multi"] for t in targets]),
                    "background": torch.cat([t["background"] for t in targets]),
                    "text": torch.cat([t["text"] for t in targets]),
                    "count": torch.stack([t["count"] for t in targets]),
                    "xy": torch.cat([t["xy"] for t in targets]),
                    "reference": torch.tensor(reference),
                    "motion": torch.tensor(frame_motion(spec, frames, reference)),
                }
            )
    return examples


def collate(examples: list[dict]) -> dict:
    grid = torch.cat([e["grid_thw"] for e in examples])
    tokens_per_frame = (grid[:, 1] * grid[:, 2] // 4).tolist()
    frame_of = torch.repeat_interleave(torch.arange(len(tokens_per_frame)), torch.tensor(tokens_per_frame))
    out = {
        "pixel_values": torch.cat([e["pixel_values"] for e in examples]),
        "grid_thw": grid,
        "frame_of": frame_of,
        "multi": torch.cat([e["multi"] for e in examples]),
        "background": torch.cat([e["background"] for e in examples]),
        "text": torch.cat([e["text"] for e in examples]),
        "count": torch.cat([e["count"] for e in examples]),
        "xy": torch.cat([e["xy"] for e in examples]),
    }
    if all("reference" in e for e in examples):  # frame indices, offset by the frames of the examples before
        offsets = torch.tensor([0] + [len(e["reference"]) for e in examples[:-1]]).cumsum(0)
        out["reference"] = torch.cat([e["reference"] + o for e, o in zip(examples, offsets)])
        out["motion"] = torch.cat([e["motion"] for e in examples])[frame_of]  # (T,) per token
    return out


def cached_examples(folder: Path, processor, min_share: float) -> list[dict]:
    """`prepare_examples` of ``folder``, kept in ``<folder>/stage0-examples.pt`` (remade when ``min_share`` or the
    targets' layout changed)."""
    path = Path(folder) / "stage0-examples.pt"
    key = {"min_share": min_share, "version": _EXAMPLES_VERSION}
    if path.exists():
        cached = torch.load(path)
        if isinstance(cached, dict) and all(cached.get(k) == v for k, v in key.items()):
            return cached["examples"]
    examples = prepare_examples(folder, processor, min_share)
    tmp = path.with_suffix(".tmp")
    torch.save({**key, "examples": examples}, tmp)
    tmp.replace(path)
    return examples
