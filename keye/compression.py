"""Token compression applied to a processed prompt: DynTok (training-free merging within a frame) and Clapper's
TimePerceiver (learned compression of segments of frames).

Both rewrite the prompt the same way (`_rewrite`): encode the video frames once (vision tower + projector), replace
each frame's ``<|video_pad|>`` run by the spans of its compressed tokens (`keye.rope.VisionSpan`), recompute the M-RoPE
positions from the rewritten layout (`keye.rope.PromptLayout`, kept by the processor), and hand the compressed tokens
to the model as ``video_embeds``.

- DynTok: a merged token sits at the (row, col) of its run's first token in its frame's full grid (see
  `keye.encoders.dyntok`); the frame keeps its markers, so the positions are a subset of the uncompressed prompt's.
- Clapper: every output chunk is a grid (a segment's pooled keyframe, then its query grid), laid out like an image of
  that grid at the time of the frame it is dated to (`ClapperOutput.grids`). A chunk takes that frame's place and
  markers (``<|frame|>`` + timestamp, and ``<|fast_start|>``/``<|fast_end|>`` when it was a fast frame); the frames whose
  tokens went into a segment's query chunk lose their markers too, since a timestamp with no tokens after it would
  announce a frame that is not there. The text after the video moves up to follow the shorter layout.

Clapper uses the model's own TimePerceiver (``model.clapper``, from ``config.clapper_config``). A model without one
(every checkpoint so far, keye-tiny included) gets an untrained, identity-initialised TimePerceiver (the default
segment, queries and keyframe pooling; no perceiver layers, since untrained they add nothing), with a warning: its
tokens are the plain pooled tokens (keyframes 2x2-pooled, the other frames of a segment pooled over time and space
to the query grid), which the language model reads like any pooled image tokens.

Only batches of one conversation are compressed (chat and evaluation use one).
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from keye.encoders import COMPRESSIONS
from keye.encoders.clapper import ClapperConfig, ClapperOutput, TimePerceiver
from keye.encoders.dyntok import DYNTOK_THRESHOLD, DynTokResult, dyntok_frames
from keye.rope import PromptLayout, TextSpan, VisionSpan, mrope_positions

logger = logging.getLogger(__name__)

_PER_TOKEN = ("input_ids", "attention_mask", "labels")
_UNTRAINED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its stand-in TimePerceiver


@dataclass
class _Frame:
    """One video frame of a processed prompt."""

    span: VisionSpan
    index: int  # frame number within its video
    pads: slice  # its <|video_pad|> run in the sequence
    # all its tokens: <|frame|> time [<|fast_start|>] pads [<|fast_end|>]; None for a video's first frame, whose
    # markers share a text span with <|vision_start|> (no compression removes it)
    markers: slice | None


def _layout(inputs) -> PromptLayout:
    layouts = getattr(inputs, "layouts", None)
    if layouts is None or getattr(inputs, "videos", None) is None:
        raise ValueError("compression needs KeyeProcessor's output as it is (its .layouts and .videos)")
    if inputs["input_ids"].shape[0] != 1 or len(layouts) != 1:
        raise ValueError("compression works on one conversation at a time")
    return layouts[0]


def _video_frames(inputs, layout: PromptLayout) -> list[_Frame]:
    """The prompt's video frames in order, with where their pad runs and markers are."""
    frames: list[_Frame] = []
    offset = 0
    for span in layout.spans:
        if isinstance(span, VisionSpan) and span.video is not None:
            pads = slice(offset, offset + span.length)
            prev = frames[-1] if frames and frames[-1].span.video == span.video else None
            index = prev.index + 1 if prev else 0
            fast_end = int(inputs.videos[span.video].kinds[index] == "fast")
            markers = None
            if prev is not None:
                # the text between two frames of a video is exactly the previous frame's [<|fast_end|>] and this
                # frame's <|frame|> time [<|fast_start|>] (see KeyeProcessor._expand)
                prev_end = int(inputs.videos[span.video].kinds[prev.index] == "fast")
                markers = slice(prev.pads.stop + prev_end, pads.stop + fast_end)
            frames.append(_Frame(span, index, pads, markers))
        offset += span.length
    return frames


def _rewrite(
    inputs, layout: PromptLayout, frames: list[_Frame], new: list[list[VisionSpan] | None], embeds
) -> dict:
    """The prompt with frame i's pad run replaced by the spans ``new[i]`` (``None``: the frame goes, markers too).

    ``embeds`` ``(sum of new span lengths, D_llm)`` become ``video_embeds``; positions are recomputed from the
    rewritten layout. Images and text stay as they are.
    """
    n = inputs["input_ids"].shape[1]
    drop = torch.zeros(n, dtype=torch.bool)  # marker tokens of removed frames
    for frame, spans in zip(frames, new):
        if spans is None:
            if frame.markers is None:
                raise ValueError("compression cannot remove the first frame of a video")
            drop[frame.markers] = True
    src, out_spans = [], []  # src: for each new token, the sequence index it copies (ids, mask, label)
    new_by_start = {f.pads.start: spans for f, spans in zip(frames, new)}
    offset = 0
    for span in layout.spans:
        index = torch.arange(offset, offset + span.length)
        if isinstance(span, TextSpan):
            kept = index[~drop[index]]
            src.append(kept)
            out_spans.append(TextSpan(len(kept)))
        elif span.video is None:  # an image
            src.append(index)
            out_spans.append(span)
        else:
            for s in new_by_start[offset] or ():
                src.append(torch.full((s.length,), offset))  # copies a pad token of the frame
                out_spans.append(s)
        offset += span.length
    src = torch.cat(src)
    n_video = sum(s.length for s in out_spans if isinstance(s, VisionSpan) and s.video is not None)
    if n_video != embeds.shape[0]:
        raise ValueError(f"compression: {embeds.shape[0]} video tokens for {n_video} places")
    out = {
        k: v
        for k, v in inputs.items()
        if k not in ("pixel_values_videos", "video_grid_thw", "video_reference_index", "video_embeds")
    }
    for k in _PER_TOKEN:
        if k in inputs:
            out[k] = inputs[k][:, src]
    out["position_ids"] = mrope_positions(out_spans, layout.tokens_per_second)[:, None]  # (3, 1, T')
    out["video_embeds"] = embeds
    return out


def _encode(model, inputs) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Video pixels -> merged patch features ``(N, 4*D_vit)``, projected tokens ``(N, D_llm)`` and each frame's
    merged (h, w) grid. The one vision-tower pass of a compressed prompt."""
    grids = inputs["video_grid_thw"]
    pixels = inputs["pixel_values_videos"].to(
        model.device, model.vision.embeddings.patch_embedding.weight.dtype
    )
    features = model.vision(pixels, grids)  # (P, D_vit)
    merged = model.projector.merge_patches(features, grids)  # (N, 4*D_vit)
    m = model.config.projector.merge_size
    projected = model.projector.project(merged, grids, inputs.get("video_reference_index"))
    return merged, projected, [(h // m, w // m) for _, h, w in grids.tolist()]


@torch.no_grad()
def dyntok_inputs(model, inputs, threshold: float = DYNTOK_THRESHOLD) -> tuple[dict, DynTokResult]:
    """Processor output with videos -> the same prompt with DynTok applied to every video frame.

    Returns new model inputs (``video_embeds`` instead of ``pixel_values_videos``) and the DynTok statistics.
    """
    layout = _layout(inputs)
    frames = _video_frames(inputs, layout)
    merged, tokens, grids = _encode(model, inputs)
    result = dyntok_frames(merged, tokens, grids, threshold)
    places = result.positions[:, 1:].cpu().split(result.tokens_per_frame)  # (G_f, 2) (row, col) in each frame
    new = [
        [VisionSpan(f.span.grid_h, f.span.grid_w, f.span.time, f.span.video, hw)]
        for f, hw in zip(frames, places)
    ]
    return _rewrite(inputs, layout, frames, new, result.tokens), result


def clapper_module(model) -> TimePerceiver:
    """The model's Clapper TimePerceiver, or (once per model, with a warning) an untrained identity-initialised one."""
    if model.clapper is not None:
        return model.clapper
    if model not in _UNTRAINED:
        logger.warning(
            "compress='clapper': this model has no trained Clapper (config.clapper_config is None); using an "
            "untrained TimePerceiver, whose tokens are plain spatio-temporally pooled tokens"
        )
        # Its output is the pooled tokens whatever its inner width and depth (out_proj starts at zero), so it gets
        # none to speak of: the paper's 1024-wide block would cost a second of CPU per 64 frames for nothing.
        config = ClapperConfig(llm_width=model.config.text.hidden_size, hidden_size=64, heads=1, layers=0)
        with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
            torch.manual_seed(0)
            module = TimePerceiver(config)
        _UNTRAINED[model] = module.to(model.device, model.dtype).eval()
    return _UNTRAINED[model]


@torch.no_grad()
def clapper_inputs(model, inputs) -> tuple[dict, list[ClapperOutput]]:
    """Processor output with videos -> the same prompt with each video compressed by Clapper's TimePerceiver.

    Returns new model inputs (``video_embeds`` instead of ``pixel_values_videos``) and one `ClapperOutput` per video.
    """
    layout = _layout(inputs)
    frames = _video_frames(inputs, layout)
    _, tokens, grids = _encode(model, inputs)
    per_frame = tokens.split([h * w for h, w in grids])
    clapper = clapper_module(model)
    videos: dict[int, list[int]] = {}  # video -> its frames (indices into `frames`), in prompt order
    for i, f in enumerate(frames):
        videos.setdefault(f.span.video, []).append(i)
    new: list[list[VisionSpan] | None] = [None] * len(frames)
    outputs = []
    for video, members in videos.items():  # segments never cross videos
        out = clapper([per_frame[i] for i in members], [grids[i] for i in members])
        for k, h, w in out.grids:  # each chunk takes the place of the frame it is dated to
            frame = frames[members[k]]
            new[members[k]] = [VisionSpan(h, w, time=frame.span.time, video=video)]
        outputs.append(out)
    embeds = torch.cat([o.tokens for o in outputs])
    return _rewrite(inputs, layout, frames, new, embeds), outputs


class Compressor:
    """A token compression, chosen once by name (`compressor`): how it rewrites a processed prompt (`prompt`) and how
    many tokens it leaves of a video's encoded frames (`count`). This base class is "none"."""

    name = "none"

    def prompt(self, model, inputs) -> dict:
        """The processed prompt with the compression applied (``video_embeds`` replacing the video's pixels)."""
        return dict(inputs)

    def count(self, model, merged: torch.Tensor, tokens: torch.Tensor, grids: list[tuple[int, int]]) -> int:
        """Tokens left of encoded frames: merged patch features, projected tokens and each frame's merged grid."""
        return int(tokens.shape[0])


class DynTok(Compressor):
    name = "dyntok"

    def prompt(self, model, inputs) -> dict:
        return dyntok_inputs(model, inputs)[0]

    def count(self, model, merged, tokens, grids) -> int:
        return int(dyntok_frames(merged, tokens, grids).tokens_after)


class Clapper(Compressor):
    name = "clapper"

    def prompt(self, model, inputs) -> dict:
        return clapper_inputs(model, inputs)[0]

    def count(self, model, merged, tokens, grids) -> int:
        per_frame = list(tokens.split([h * w for h, w in grids]))
        return int(clapper_module(model)(per_frame, grids).tokens.shape[0])


_COMPRESSORS = {c.name: c for c in (Compressor, DynTok, Clapper)}
assert tuple(_COMPRESSORS) == COMPRESSIONS  # the names a CLI lists without importing this module


def compressor(method: str | Compressor) -> Compressor:
    """The `Compressor` named ``method`` ("none" | "dyntok" | "clapper"; a `Compressor` is returned as it is)."""
    if isinstance(method, Compressor):
        return method
    if method not in _COMPRESSORS:
        raise ValueError(f"unknown compression {method!r}; choose from {COMPRESSIONS}")
    return _COMPRESSORS[method]()


def compress_inputs(model, inputs, method: str | Compressor) -> tuple[dict, int]:
    """Apply ``method`` to a processed prompt; returns (inputs, video tokens after)."""
    method = compressor(method)
    if method.name == "none" or "pixel_values_videos" not in inputs:
        n = int((inputs["input_ids"] == model.config.video_token_id).sum())
        return dict(inputs), n
    out = method.prompt(model, inputs)
    return out, int(out["video_embeds"].shape[0])


@torch.no_grad()
def compressed_video_tokens(model, processor, video, method: str | Compressor) -> int:
    """Vision tokens of one planned video (`keye.processing.VideoInput`) after ``method``, with no prompt around it:
    the vision tower, projector and compressor only, so any video length works (``keye frames --compress``)."""
    from keye.encoders.slowfast import reference_frames

    method = compressor(method)
    if method.name == "none":
        return video.plan.total_tokens
    pixels, grids = processor.preprocess_video(video)
    inputs = {
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor(grids, dtype=torch.long),
        "video_reference_index": torch.tensor(reference_frames(video.kinds), dtype=torch.long),
    }
    merged, tokens, merged_grids = _encode(model, inputs)
    return method.count(model, merged, tokens, merged_grids)
