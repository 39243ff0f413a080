"""Encoding each video once vs once per question (keye-tiny, KeyePredictor), interleaved in one run.

Video-MME asks three questions per video. For each of a few generated videos, time (a) one `prepare_video` (decode,
Slow-Fast, vision tower, prefill of the video prefix) and three answers that reuse its KV cache, against (b) three
times `prepare_video` + one answer, alternating (a) and (b) so both see the same machine load.

Run: ``python -m bench.bench_eval`` (part of ``make bench``).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "What colour is the first shape?\nThe best answer is:",
    "How many objects are there?\nThe best answer is:",
    "Which way does the shape move?\nThe best answer is:",
]


def main(n_videos: int = 3) -> dict:
    from keye import load_pretrained
    from keye.eval.keye_predictor import KeyePredictor
    from keye.synthetic import make_demo_video

    model, processor = load_pretrained("keye-tiny")
    predictor = KeyePredictor(model, processor, name="keye-tiny")
    enc = dict(fps=None, max_frames=None, token_budget=None, compress="none", subtitles=None)
    tmp = Path(tempfile.mkdtemp(prefix="keye-bench-"))
    once, per_question = 0.0, 0.0
    for i in range(n_videos):
        video = str(
            make_demo_video(tmp / f"v{i}.mp4", seed=10 + i, duration=8.0, size=(224, 320), fps=12).media
        )
        t0 = time.perf_counter()
        prepared = predictor.prepare_video(video, **enc)
        answers_once = [predictor.answer(prepared, q, max_new_tokens=8, think=False).text for q in QUESTIONS]
        once += time.perf_counter() - t0
        t0 = time.perf_counter()
        answers_each = []
        for q in QUESTIONS:
            answers_each.append(predictor.answer(predictor.prepare_video(video, **enc), q, max_new_tokens=8,
                                                 think=False).text)  # fmt: skip
        per_question += time.perf_counter() - t0
        assert answers_once == answers_each, "cache reuse changed an answer"
    print(
        f"{n_videos} videos x {len(QUESTIONS)} questions: encode once {once:.1f} s, encode per question "
        f"{per_question:.1f} s -> speed-up {per_question / once:.2f}x (identical answers)"
    )
    return {"once_s": once, "per_question_s": per_question, "speedup": per_question / once}


if __name__ == "__main__":
    main()
