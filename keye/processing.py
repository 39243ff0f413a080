"""KeyeProcessor: chat messages with images and videos -> model inputs.

    messages --render--> ChatML text with one placeholder per image/video
             --expand--> per-frame layout: <|frame|>1.5 [<|fast_start|>] <|video_pad|> x n [<|fast_end|>]
             --tokenize--> input_ids (B, T), attention_mask, labels (assistant tokens only)
    images/videos --smart_resize, normalize, patchify--> pixel_values(_videos) (N, 3*14*14), *_grid_thw (items, 3)
    spans --keye.rope--> position_ids (3, B, T)

Messages use the transformers layout: ``{"role": "user", "content": [{"type": "video", "video": "clip.mp4"},
{"type": "text", "text": "What happens?"}]}``; ``content`` may also be a plain string. An image part may hold a path,
a PIL image or an array; a video part a path (frames are chosen by Slow-Fast selection, `keye.encoders.slowfast`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoProcessor, AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from keye.configuration import VISION_TOKENS, KeyeConfig
from keye.encoders.slowfast import reference_frames
from keye.errors import ContextLengthError
from keye.rope import PromptLayout, TextSpan, VisionSpan
from keye.settings import (  # noqa: F401  (re-exported: the processor's settings live in the light keye.settings)
    OFFICIAL_FETCH_MAX_PIXELS,
    OFFICIAL_SYSTEM,
    PROCESSOR_CONFIG,
    ProcessorSettings,
    folder_settings,
)

IGNORE_INDEX = -100
# The vision inputs `KeyeProcessor.__call__` returns, when present (what batches and chat turns carry to the model).
VISION_INPUTS = (
    "pixel_values",
    "image_grid_thw",
    "pixel_values_videos",
    "video_grid_thw",
    "video_reference_index",
)

# The same rendering as `KeyeProcessor.render`, for tools that only speak Jinja (tokenizer.apply_chat_template).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' and default_system %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}{%- endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{ message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' %}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' %}{{ part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = 3136, max_pixels: int = 1003520
):
    """Nearest size with both sides multiples of ``factor`` and ``min_pixels <= h*w <= max_pixels``, aspect kept."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio must be below 200, got {height}x{width}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(image: np.ndarray, patch: int = 14, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """RGB uint8 ``(H, W, 3)`` (multiples of ``patch``) -> normalized row-major patches ``(H/p * W/p, 3*p*p)``."""
    h, w = image.shape[:2]
    x = torch.from_numpy(image.astype(np.float32)).div_(255.0).sub_(mean).div_(std)  # (H, W, 3)
    x = x.view(h // patch, patch, w // patch, patch, 3).permute(0, 2, 4, 1, 3)  # (h, w, 3, p, p)
    return x.reshape(-1, 3 * patch * patch)


def _source_name(media) -> str | None:
    """The file a prompt's image or video came from (a path, or a loaded video's plan), for error messages; None
    for in-memory media (never an object's repr)."""
    if isinstance(media, (str, Path)):
        return str(media)
    plan = getattr(media, "plan", None)
    return getattr(plan, "video", None) or None


@dataclass
class VideoInput:
    """A decoded, planned video: frames at their planned sizes plus the Slow-Fast plan (kept for display)."""

    frames: list[np.ndarray]
    times: list[float]
    kinds: list[str]  # "slow" | "fast" per frame
    plan: Any = None  # keye.encoders.slowfast.VideoPlan


@dataclass
class _Expanded:
    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    spans: list = field(default_factory=list)


class KeyeProcessor:
    """Turns chat messages (text, images, videos) into `KeyeForConditionalGeneration` inputs."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        settings: ProcessorSettings | None = None,
        tokens_per_second: float | None = 2.0,
    ):
        """``tokens_per_second`` is the model's time rule for video positions (`KeyeConfig.tokens_per_second`, which
        `from_pretrained` reads from the folder's config.json; ``None`` is Keye-VL-1.5's, see `keye.rope`)."""
        self.tokenizer = tokenizer
        self.settings = settings or ProcessorSettings()
        self.tokens_per_second = tokens_per_second
        missing = [t for t in VISION_TOKENS.values() if t not in tokenizer.get_vocab()]
        if missing:
            raise ValueError(
                f"tokenizer lacks the Keye special tokens {missing}; see keye.pretrained.add_keye_tokens"
            )
        self.token_ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in VISION_TOKENS.items()}
        if tokenizer.chat_template is None:
            tokenizer.chat_template = CHAT_TEMPLATE

    # ---------------------------------------------------------------- media
    def preprocess_image(self, image) -> tuple[torch.Tensor, list[int]]:
        """Image (path, PIL, array) -> patches ``(h*w, 3*14*14)`` and grid ``[1, h, w]`` (in 14px patches)."""
        from PIL import Image

        from keye.encoders.image import load_image

        img = load_image(image)
        s = self.settings
        factor = s.patch_size * s.merge_size
        if s.fetch_max_pixels is not None:  # the official first resize (PIL copies when the size is kept)
            h, w = smart_resize(img.height, img.width, factor, s.min_pixels, s.fetch_max_pixels)
            img = img.resize((w, h), Image.BICUBIC)
        h, w = smart_resize(img.height, img.width, factor, s.min_pixels, s.max_pixels)
        arr = np.asarray(img.resize((w, h), Image.BICUBIC))
        return patchify(arr, s.patch_size, s.image_mean, s.image_std), [
            1,
            h // s.patch_size,
            w // s.patch_size,
        ]

    def load_video(self, video, **overrides) -> VideoInput:
        """Decode and plan a video (Slow-Fast selection within the token budget). ``overrides`` replace settings
        (``None`` values are ignored)."""
        if isinstance(video, VideoInput):
            return video
        from keye.encoders.slowfast import plan_video

        cfg = self.settings.video_config(**overrides)
        plan, frames = plan_video(str(video), cfg)
        return VideoInput(
            frames=frames, times=[f.time for f in plan.frames], kinds=[f.kind for f in plan.frames], plan=plan
        )

    def preprocess_video(self, video: VideoInput) -> tuple[torch.Tensor, list[list[int]]]:
        """Frames -> patches ``(sum h*w, 3*14*14)`` and one grid row ``[1, h, w]`` per frame."""
        s = self.settings
        patches, grids = [], []
        for frame in video.frames:
            h, w = frame.shape[:2]
            patches.append(patchify(frame, s.patch_size, s.image_mean, s.image_std))
            grids.append([1, h // s.patch_size, w // s.patch_size])
        return torch.cat(patches), grids

    # ---------------------------------------------------------------- text
    def render(
        self, messages: list[dict], add_generation_prompt: bool, think: bool | None
    ) -> list[tuple[str, Any]]:
        """Messages -> list of (role, piece) where piece is text or an ``("image"|"video", value)`` placeholder.

        ``think`` True/False appends ``/think`` or ``/no_think`` to the last user turn (after
        ``settings.think_separator``; False also pre-fills the empty ``<think></think>`` block after the generation
        prompt when ``settings.prefill_no_think``); None leaves the prompt as is.
        """
        messages = [dict(m) for m in messages]
        if think is not None:
            last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
            switch = self.settings.think_separator + ("/think" if think else "/no_think")
            content = messages[last_user]["content"]
            if isinstance(content, str):
                messages[last_user]["content"] = content + switch
            elif content and content[-1]["type"] == "text":  # one text, tokenized as the template renders it
                messages[last_user]["content"] = [
                    *content[:-1],
                    {**content[-1], "text": content[-1]["text"] + switch},
                ]
            else:
                messages[last_user]["content"] = [*content, {"type": "text", "text": switch}]
        pieces: list[tuple[str, Any]] = []
        if messages and messages[0]["role"] != "system" and self.settings.default_system:
            pieces.append(("system", f"<|im_start|>system\n{self.settings.default_system}<|im_end|>\n"))
        for m in messages:
            role = m["role"]
            pieces.append(("header", f"<|im_start|>{role}\n"))
            content = m["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                if part["type"] == "text":
                    pieces.append((role, part["text"]))
                elif part["type"] in ("image", "video"):
                    pieces.append((role, (part["type"], part[part["type"]])))
                else:
                    raise ValueError(f"unknown message part type {part['type']!r}")
            pieces.append((role, "<|im_end|>"))
            pieces.append(("header", "\n"))
        if add_generation_prompt:
            pieces.append(("header", "<|im_start|>assistant\n"))
            if think is False and self.settings.prefill_no_think:
                pieces.append(("header", "<think>\n\n</think>\n\n"))
        return pieces

    def _encode_text(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _expand(self, pieces, images: list, videos: list, train_roles: set[str]) -> _Expanded:
        t = self.token_ids
        out = _Expanded()
        text_buf: list[int] = []
        text_lab: list[int] = []

        def flush():
            if text_buf:
                out.ids.extend(text_buf)
                out.labels.extend(text_lab)
                out.spans.append(TextSpan(len(text_buf)))
                text_buf.clear()
                text_lab.clear()

        def add_text(ids: list[int], trained: bool):
            text_buf.extend(ids)
            text_lab.extend(ids if trained else [IGNORE_INDEX] * len(ids))

        def add_vision(token: int, grid_h: int, grid_w: int, **kw):
            flush()
            n = grid_h * grid_w
            out.ids.extend([token] * n)
            out.labels.extend([IGNORE_INDEX] * n)
            out.spans.append(VisionSpan(grid_h, grid_w, **kw))

        m = self.settings.merge_size
        for role, piece in pieces:
            trained = role in train_roles
            if isinstance(piece, str):
                for tok_id in self._encode_text(piece):
                    add_text([tok_id], trained)
                continue
            kind, _ = piece
            add_text([t["vision_start"]], False)
            if kind == "image":
                grid = images.pop(0)
                add_vision(t["image_pad"], grid[1] // m, grid[2] // m)
            else:
                video_index, video, grids = videos.pop(0)
                for time, kind_, grid in zip(video.times, video.kinds, grids):
                    add_text([t["frame"], *self._encode_text(f"{time:.1f}")], False)
                    if kind_ == "fast":
                        add_text([t["fast_start"]], False)
                    add_vision(t["video_pad"], grid[1] // m, grid[2] // m, time=time, video=video_index)
                    if kind_ == "fast":
                        add_text([t["fast_end"]], False)
            add_text([t["vision_end"]], False)
        flush()
        return out

    def __call__(
        self,
        messages: list[dict] | list[list[dict]],
        *,
        add_generation_prompt: bool = True,
        think: bool | None = None,
        return_labels: bool = False,
        padding_side: str = "left",
        **video_overrides,
    ) -> BatchFeature:
        """Process one conversation (a list of messages) or a batch of them.

        Returns ``input_ids``, ``attention_mask``, ``position_ids`` (3, B, T), and when present ``pixel_values``,
        ``image_grid_thw``, ``pixel_values_videos``, ``video_grid_thw``, ``video_reference_index`` (each video
        frame's reference frame, `keye.encoders.slowfast.reference_frames`), ``labels`` (``return_labels``: only the
        assistant turns' tokens are trained). ``.videos`` holds each video's `VideoInput` (frames, Slow-Fast plan),
        ``.layouts`` each conversation's `PromptLayout` (its spans, for `keye.compression`).
        """
        batch = [messages] if messages and isinstance(messages[0], dict) else messages
        all_ids, all_labels, all_pos, layouts = [], [], [], []
        pix, img_grids, vpix, vid_grids, vid_refs, loaded = [], [], [], [], [], []
        for conv in batch:
            pieces = self.render(conv, add_generation_prompt, think)
            images, videos = [], []
            for _, piece in pieces:
                if isinstance(piece, tuple) and piece[0] == "image":
                    patches, grid = self.preprocess_image(piece[1])
                    pix.append(patches)
                    img_grids.append(grid)
                    images.append(grid)
                elif isinstance(piece, tuple) and piece[0] == "video":
                    video = self.load_video(piece[1], **video_overrides)
                    patches, grids = self.preprocess_video(video)
                    vpix.append(patches)
                    vid_refs.extend(len(vid_grids) + r for r in reference_frames(video.kinds))
                    vid_grids.extend(grids)
                    videos.append((len(loaded), video, grids))
                    loaded.append(video)
            ex = self._expand(pieces, images, videos, train_roles={"assistant"})
            if len(ex.ids) > self.settings.max_length:
                sources = [s for _, p in pieces if isinstance(p, tuple) and (s := _source_name(p[1]))]
                raise ContextLengthError(
                    ", ".join(sources) or "prompt",
                    f"prompt needs {len(ex.ids)} tokens, more than the context of {self.settings.max_length}; "
                    "lower --token-budget/--max-frames or shorten the prompt",
                )
            all_ids.append(ex.ids)
            all_labels.append(ex.labels)
            layouts.append(PromptLayout(ex.spans, self.tokens_per_second))
            all_pos.append(layouts[-1].positions())

        length = max(len(x) for x in all_ids)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        pos = torch.ones((3, len(batch), length), dtype=torch.long)
        for i, (x, lab, p) in enumerate(zip(all_ids, all_labels, all_pos)):
            sl = slice(length - len(x), length) if padding_side == "left" else slice(0, len(x))
            ids[i, sl] = torch.tensor(x)
            labels[i, sl] = torch.tensor(lab)
            mask[i, sl] = 1
            pos[:, i, sl] = p
        data = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if return_labels:
            data["labels"] = labels
        if pix:
            data["pixel_values"] = torch.cat(pix)
            data["image_grid_thw"] = torch.tensor(img_grids, dtype=torch.long)
        if vpix:
            data["pixel_values_videos"] = torch.cat(vpix)
            data["video_grid_thw"] = torch.tensor(vid_grids, dtype=torch.long)
            data["video_reference_index"] = torch.tensor(vid_refs, dtype=torch.long)
        out = BatchFeature(data=data)
        out.videos = loaded
        out.layouts = layouts  # per conversation, unpadded: what `keye.compression` rewrites
        return out

    # ---------------------------------------------------------------- decode / save / load
    def decode(self, ids, skip_special_tokens: bool = True, **kw) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def batch_decode(self, ids, skip_special_tokens: bool = True, **kw) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=skip_special_tokens, **kw)

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        (directory / PROCESSOR_CONFIG).write_text(json.dumps(asdict(self.settings), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> KeyeProcessor:
        """Tokenizer, ``keye_processor.json`` and the model's time rule (``tokens_per_second`` in config.json) from a
        model folder: what the model was built with, whatever the caller remembers."""
        directory = Path(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        settings = folder_settings(directory)
        tps = 2.0
        if (directory / "config.json").exists():
            tps = KeyeConfig.from_pretrained(directory).tokens_per_second
        return cls(tokenizer, settings, tokens_per_second=tps)


AutoProcessor.register(KeyeConfig, KeyeProcessor, exist_ok=True)
