"""`KeyePredictor`: the harness's `Predictor` over keye's public API (load_pretrained, processor, generate).

Each video is decoded, encoded and prefilled ONCE: `prepare_video` runs the prompt prefix that ends with the video
(``<|im_start|>user\\n<|vision_start|> ... <|vision_end|>``) through the model and keeps its KV cache; every question
then only prefills its own text on top of that cache, which is cropped back to the prefix afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from keye import load_pretrained
from keye.eval.predictor import Prediction, Subtitle
from keye.processing import VideoInput


@dataclass
class PreparedVideo:
    video: VideoInput
    prefix_ids: torch.Tensor  # (1, L) prompt tokens up to and including <|vision_end|>
    cache: DynamicCache | None  # KV cache of prefix_ids; None when reuse is off
    overrides: dict


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
        fps: float,
        max_frames: int,
        token_budget: int,
        compress: str,
        subtitles: list[Subtitle] | None = None,
    ) -> PreparedVideo:
        if compress != "none":
            raise NotImplementedError(
                f"compress={compress!r}: DynTok/Clapper are not wired into generation yet"
            )
        overrides = dict(fps=fps, max_frames=max_frames, token_budget=token_budget)
        video = self.processor.load_video(video_path, **overrides)  # raises VideoDecodeError on a bad file
        inputs = self.processor(self._messages(video, ""))
        end = int((inputs["input_ids"][0] == self.model.config.vision_end_token_id).nonzero()[-1]) + 1
        prefix = inputs["input_ids"][:, :end]
        cache = None
        if self.reuse_cache:
            cache = DynamicCache(config=self.model.config.text_config)
            device = self.model.device
            with torch.inference_mode():
                self.model(
                    input_ids=prefix.to(device),
                    position_ids=inputs["position_ids"][:, :, :end].to(device),
                    pixel_values_videos=inputs["pixel_values_videos"].to(device),
                    video_grid_thw=inputs["video_grid_thw"].to(device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
        return PreparedVideo(video=video, prefix_ids=prefix, cache=cache, overrides=overrides)

    def answer(self, prepared: PreparedVideo, prompt: str, *, max_new_tokens: int, think: bool) -> Prediction:
        inputs = self.processor(self._messages(prepared.video, prompt), think=think if think else None)
        ids = inputs["input_ids"]
        device = self.model.device
        kwargs: dict[str, Any] = dict(
            input_ids=ids.to(device),
            attention_mask=torch.ones_like(ids).to(device),
            position_ids=inputs["position_ids"].to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
        n = prepared.prefix_ids.shape[1]
        if prepared.cache is not None:
            assert torch.equal(ids[:, :n], prepared.prefix_ids), "prompt prefix changed between questions"
            kwargs["cache"] = prepared.cache
        else:
            kwargs.update(
                pixel_values_videos=inputs["pixel_values_videos"].to(device),
                video_grid_thw=inputs["video_grid_thw"].to(device),
            )
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(**kwargs)
        latency = time.perf_counter() - start
        if prepared.cache is not None:
            prepared.cache.crop(
                n - prepared.cache.get_seq_length()
            )  # back to the video prefix (negative = drop)
        new = out[0, ids.shape[1] :]
        return Prediction(
            text=self.processor.decode(new).strip(), num_tokens=int(new.numel()), latency_s=latency
        )

    def sampled_frame_times(self, prepared: PreparedVideo) -> list[float]:
        return list(prepared.video.times)


def make_predictor(model_name: str = "keye-tiny", **kwargs) -> KeyePredictor:
    model, processor = load_pretrained(model_name)
    return KeyePredictor(model, processor, name=model_name, **kwargs)
