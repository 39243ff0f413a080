"""`KeyePredictor`: the harness's `Predictor` over keye's public API (load_pretrained, processor, generate).

Each video is decoded, encoded (and compressed, with ``--compress dyntok|clapper``) ONCE: `prepare_video` runs the prompt
prefix that ends with the video (``<|im_start|>user\\n<|vision_start|> ... <|vision_end|>``) through the model and keeps
it as a `CachedPrefix` (keye's one prefix-reuse mechanism, the chat's too); every question then only prefills its own
text on top of it, which is rewound to the prefix afterwards. With ``reuse_cache=False`` the video's tokens are kept instead and the prefix is prefilled per question.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from keye import load_pretrained
from keye.compression import compress_inputs
from keye.eval.predictor import Prediction, Subtitle
from keye.prefix import CachedPrefix
from keye.processing import VideoInput


@dataclass
class PreparedVideo:
    video: VideoInput
    # prompt tokens up to and including <|vision_end|> (after compression), their positions and, with reuse, their
    # KV cache (without reuse the cache stays empty and the video's tokens are kept instead)
    prefix: CachedPrefix
    full_prefix_length: int  # the same prefix before compression (where each question's own tokens start)
    position_shift: int  # compressed minus uncompressed position of the text after the video (Clapper: < 0)
    video_embeds: torch.Tensor | None  # the video's tokens, kept when reuse is off
    vision_tokens: int


class KeyePredictor:
    def __init__(self, model, processor, *, name: str, reuse_cache: bool = True):
        self.name = name
        self.model, self.processor = model, processor
        self.reuse_cache = reuse_cache

    def _messages(self, video, prompt: str) -> list[dict]:
        return [
            {"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": prompt}]}
        ]

    def prepare_video(
        self,
        video_path: str,
        *,
        fps: float | None,
        max_frames: int | None,
        token_budget: int | None,
        compress: str,
        subtitles: list[Subtitle] | None = None,
    ) -> PreparedVideo:
        video = self.processor.load_video(
            video_path, fps=fps, max_frames=max_frames, token_budget=token_budget
        )
        full = self.processor(self._messages(video, ""))
        full_end = int((full["input_ids"][0] == self.model.config.vision_end_token_id).nonzero()[-1]) + 1
        if compress == "none":
            with torch.inference_mode():
                full["video_embeds"] = self.model.encode_vision(
                    full["pixel_values_videos"].to(self.model.device),
                    full["video_grid_thw"],
                    full.get("video_reference_index"),
                )
        inputs, n_tokens = compress_inputs(self.model, full, compress)  # encodes the video (once)
        end = int((inputs["input_ids"][0] == self.model.config.vision_end_token_id).nonzero()[-1]) + 1
        ids, positions = inputs["input_ids"][:, :end], inputs["position_ids"][:, :, :end]
        embeds = inputs["video_embeds"]
        prefix = CachedPrefix.empty(self.model)
        if self.reuse_cache:
            prefix.prefill(self.model, ids, positions, video_embeds=embeds)
            embeds = None
        else:
            prefix.commit(
                ids, positions
            )  # the tokens only: each question runs them again with the video's tokens
            prefix.cache = None
        # the text after the video continues after the (maybe shorter) compressed layout: shift questions' positions
        shift = int(positions[0, 0, -1] - full["position_ids"][0, 0, full_end - 1])  # both at <|vision_end|>
        return PreparedVideo(video, prefix, full_end, shift, embeds, n_tokens)

    def answer(self, prepared: PreparedVideo, prompt: str, *, max_new_tokens: int, think: bool) -> Prediction:
        # The question's own tokens and positions: the part after the video of a freshly processed prompt, its
        # positions moved to follow the compressed video (text positions are equal on the three axes).
        full = self.processor(self._messages(prepared.video, prompt), think=think if think else None)
        suffix = slice(prepared.full_prefix_length, None)
        question = full["position_ids"][:, :, suffix] + prepared.position_shift
        prefix = prepared.prefix
        kwargs: dict[str, Any] = prefix.continue_with(
            full["input_ids"][:, suffix], question, self.model.device
        )
        kwargs.update(max_new_tokens=max_new_tokens, do_sample=False)
        if prefix.cache is None:
            kwargs["video_embeds"] = prepared.video_embeds
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        latency = time.perf_counter() - start
        prefix.rewind()  # back to the video prefix for the next question
        new = out[0, kwargs["input_ids"].shape[1] :]
        return Prediction(
            text=self.processor.decode(new).strip(), num_tokens=int(new.numel()), latency_s=latency
        )

    def sampled_frame_times(self, prepared: PreparedVideo) -> list[float]:
        return list(prepared.video.times)


def make_predictor(model_name: str = "keye-tiny", **kwargs) -> KeyePredictor:
    model, processor = load_pretrained(model_name)
    return KeyePredictor(model, processor, name=model_name, **kwargs)
