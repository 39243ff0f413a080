"""keye's JSONL chat manifests from samples, whole datasets, and ``python -m keye.synthetic``."""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from keye.synthetic.samples import make_demo_video, make_image_sample, make_video_sample
from keye.synthetic.world import (
    _STREAM_KIND,
    MC_SUFFIX,
    MIXED_STYLE_WEIGHTS,
    QA,
    QTYPES,
    QUESTION_STYLES,
    Sample,
    _rng,
)

# ----------------------------------------------------------------------------------------------------------------------
# Manifests and datasets
# ----------------------------------------------------------------------------------------------------------------------


def format_prompt(qa: QA, style: str) -> tuple[str, str]:
    """``(user text, assistant text)`` of ``qa`` in ``style`` "open" (question -> short answer) or "mc" (question,
    the four options on their own lines, `MC_SUFFIX` -> letter)."""
    if style == "open":
        return qa.question, qa.answer
    if style == "mc":
        return "\n".join([qa.question, *qa.options, MC_SUFFIX]), qa.answer_letter
    raise ValueError(f"unknown question style {style!r}; expected 'open' or 'mc'")


def _line(sample: Sample, media: str, qtype: str, user: str, answer: str, meta: dict, line_id: str) -> dict:
    part = {"type": sample.kind, sample.kind: media}
    return {
        "id": line_id,
        "messages": [
            {"role": "user", "content": [part, {"type": "text", "text": user}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ],
        "meta": {"qtype": qtype, **meta, "source": "synthetic", "seed": sample.seed, "index": sample.index},
    }


def _question_line(sample: Sample, media: str, qa: QA, style: str, line_id: str) -> dict:
    user, answer = format_prompt(qa, style)
    meta = {"answer": qa.answer, "options": qa.options, "answer_letter": qa.answer_letter, "style": style}
    return _line(sample, media, qa.qtype, user, answer, meta, line_id)


def _caption_line(sample: Sample, media: str, line_id: str) -> dict:
    meta = {"answer": sample.caption, "options": [], "answer_letter": None, "style": "caption"}
    return _line(sample, media, "caption", f"Describe the {sample.kind}.", sample.caption, meta, line_id)


def manifest_lines(
    samples: Iterable[Sample],
    manifest_dir: str | Path,
    *,
    question_style: str = "mixed",
    seed: int = 0,
    per_sample: str = "one",
    qtypes: Sequence[str] | None = None,
) -> Iterator[dict]:
    """The manifest records `write_manifest` writes (see there), as dicts."""
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"unknown question_style {question_style!r}; expected one of {QUESTION_STYLES}")
    if per_sample not in ("one", "all"):
        raise ValueError(f"per_sample must be 'one' or 'all', got {per_sample!r}")
    unknown = set(qtypes or ()) - {*QTYPES, "caption"}
    if unknown:
        raise ValueError(f"unknown qtypes {sorted(unknown)}; expected some of {(*QTYPES, 'caption')}")
    captions = qtypes is None or "caption" in qtypes
    if question_style == "caption" and not captions:
        raise ValueError(f"question_style='caption' but qtypes {list(qtypes or ())} excludes 'caption'")
    mixed = {k: v for k, v in MIXED_STYLE_WEIGHTS.items() if captions or k != "caption"}
    styles, weights = list(mixed), np.array(list(mixed.values()))
    manifest_dir = Path(manifest_dir)
    for sample in samples:
        rng = np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(sample.id.encode())]))
        media = Path(os.path.relpath(sample.media, manifest_dir)).as_posix()
        qas = [q for q in sample.questions if qtypes is None or q.qtype in qtypes]

        if per_sample == "one":
            style = question_style
            if style == "mixed":
                style = str(rng.choice(styles, p=weights / weights.sum()))
            if style == "caption":
                yield _caption_line(sample, media, sample.id)
            elif qas:  # a sample whose questions the qtypes filter removed gets no line
                yield _question_line(sample, media, qas[rng.integers(len(qas))], style, sample.id)
            continue
        if captions and question_style in ("caption", "mixed"):
            yield _caption_line(sample, media, f"{sample.id}-caption")
        if question_style != "caption":
            for qa in qas:
                style = (
                    question_style if question_style != "mixed" else ("open" if rng.random() < 0.5 else "mc")
                )
                yield _question_line(sample, media, qa, style, f"{sample.id}-{qa.qtype}")


def write_manifest(
    samples: Iterable[Sample],
    path: str | Path,
    *,
    question_style: str = "mixed",
    seed: int = 0,
    per_sample: str = "one",
    qtypes: Sequence[str] | None = None,
) -> Path:
    """Write a JSONL chat manifest, one training example per line, media paths relative to the manifest's folder::

        {"id": "syn-video-0-000003",
         "messages": [{"role": "user", "content": [{"type": "video", "video": "media/syn-video-0-000003.mp4"},
                                                   {"type": "text", "text": "What colour is the square?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "red"}]}],
         "meta": {"qtype": "colour", "answer": "red", "options": ["A. blue", "B. red", ...], "answer_letter": "B",
                  "style": "open", "source": "synthetic", "seed": 0, "index": 3}}

    Images use ``{"type": "image", "image": "media/x.png"}``. ``question_style``: "open" (short answer), "mc" (options
    on separate lines after the question, then `MC_SUFFIX`; the answer is the letter), "caption" ("Describe the
    video." -> caption; qtype "caption", no options) or "mixed" (each line draws a style with `MIXED_STYLE_WEIGHTS`).
    ``per_sample="one"`` writes one line per sample (id = the sample's id) with a question drawn at random; "all" writes
    one line per question (plus a caption line for "caption"/"mixed"), ids suffixed with the qtype. ``qtypes`` keeps
    only those question types, "caption" included (a curriculum: colour first, order last; None keeps all); a sample
    left without questions gets no line. Choices depend only on ``seed`` and each sample's id.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = manifest_lines(
        samples, path.parent, question_style=question_style, seed=seed, per_sample=per_sample, qtypes=qtypes
    )
    with open(path, "w") as fh:
        for line in lines:
            fh.write(json.dumps(line) + "\n")
    return path


def load_samples(path: str | Path) -> list[Sample]:
    """Read the ``samples.jsonl`` that `generate_dataset` writes (one `Sample.to_dict` per line)."""
    with open(path) as fh:
        return [Sample.from_dict(json.loads(line)) for line in fh if line.strip()]


def _dataset_item(args: tuple) -> Sample:
    media_dir, seed, i, kind, kw = args
    if kind == "video":
        return make_video_sample(media_dir, seed, index=i, **kw["video"])
    return make_image_sample(media_dir, seed, index=i, **kw["image"])


def generate_dataset(
    out_dir: str | Path,
    *,
    seed: int,
    n: int,
    kinds: Sequence[str] = ("video", "image"),
    video_share: float = 0.5,
    question_style: str = "mixed",
    size: tuple[int, int] = (112, 112),
    fps: float = 8,
    duration: float = 4.0,
    n_scenes: int | None = None,
    max_objects: int = 4,
    text_prob: float = 0.5,
    object_scale: Sequence[float] | None = None,
    per_sample: str = "one",
    workers: int = 1,
    progress: bool = True,
    qtypes: Sequence[str] | None = None,
) -> Path:
    """Write ``n`` samples to ``<out_dir>/media/``, their full labels to ``<out_dir>/samples.jsonl`` and a chat
    manifest (`write_manifest`, same ``seed``, ``per_sample`` and ``qtypes``) to ``<out_dir>/manifest.jsonl``; return
    the manifest path.

    Sample ``i`` is a video with probability ``video_share`` when both kinds are allowed (drawn from ``(seed, i)``)
    and is made by `make_video_sample` / `make_image_sample` with ``index=i``, so it is the same whatever ``n`` is and
    however many ``workers`` (processes) share the work.
    """
    from tqdm.auto import tqdm

    unknown = set(kinds) - {"video", "image"}
    if unknown or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of ('video', 'image'), got {tuple(kinds)}")
    if question_style not in QUESTION_STYLES:
        raise ValueError(f"unknown question_style {question_style!r}; expected one of {QUESTION_STYLES}")
    out_dir = Path(out_dir)
    media_dir = out_dir / "media"
    media_dir.mkdir(parents=True, exist_ok=True)
    kw = {
        "video": {
            "size": size,
            "fps": fps,
            "duration": duration,
            "n_scenes": n_scenes,
            "max_objects": max_objects,
            "text_prob": text_prob,
            "object_scale": object_scale,
        },
        "image": {
            "size": size,
            "max_objects": max_objects,
            "text_prob": text_prob,
            "object_scale": object_scale,
        },
    }

    def kind_of(i: int) -> str:
        if len(set(kinds)) == 1:
            return kinds[0]
        return "video" if _rng(seed, i, "video", _STREAM_KIND).random() < video_share else "image"

    jobs = [(media_dir, seed, i, kind_of(i), kw) for i in range(n)]
    bar = tqdm(total=n, desc=f"synthetic {out_dir.name}", unit="sample", disable=not progress)
    samples: list[Sample] = []
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for sample in pool.map(_dataset_item, jobs, chunksize=8):
                samples.append(sample)
                bar.update()
    else:
        for job in jobs:
            samples.append(_dataset_item(job))
            bar.update()
    bar.close()
    with open(out_dir / "samples.jsonl", "w") as fh:
        for sample in samples:
            fh.write(json.dumps(sample.to_dict()) + "\n")
    return write_manifest(
        samples,
        out_dir / "manifest.jsonl",
        question_style=question_style,
        seed=seed,
        per_sample=per_sample,
        qtypes=qtypes,
    )


def add_object_scale_argument(parser) -> None:
    """``--object-scale LO HI`` (None when not given), as every command that generates media takes it."""
    parser.add_argument(
        "--object-scale",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="object side as a fraction of the frame's shorter side (generator default: 0.16 0.24)",
    )


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m keye.synthetic dataset OUT --n 100 --seed 0`` or ``python -m keye.synthetic demo OUT.mp4``."""
    import argparse
    import time

    import keye.synthetic

    description = keye.synthetic.__doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m keye.synthetic", description=description)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ds = sub.add_parser("dataset", help="write media + samples.jsonl + manifest.jsonl")
    ds.add_argument("out_dir")
    ds.add_argument("--n", type=int, default=100)
    ds.add_argument("--seed", type=int, default=0)
    ds.add_argument("--size", default="112x112", help="HxW")
    ds.add_argument("--fps", type=float, default=8)
    ds.add_argument("--duration", type=float, default=4.0)
    ds.add_argument("--video-share", type=float, default=0.5)
    ds.add_argument("--question-style", default="mixed", choices=QUESTION_STYLES)
    ds.add_argument("--max-objects", type=int, default=4, help="at most this many shapes per scene")
    ds.add_argument("--text-prob", type=float, default=0.5, help="share of scenes with on-screen text")
    add_object_scale_argument(ds)
    ds.add_argument(
        "--per-sample", default="one", choices=("one", "all"), help="questions per medium in the manifest"
    )
    ds.add_argument("--qtypes", nargs="+", metavar="QTYPE", help="manifest keeps only these question types")
    ds.add_argument("--workers", type=int, default=1)
    demo = sub.add_parser("demo", help="write a demo clip")
    demo.add_argument("path")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--duration", type=float, default=10.0)
    demo.add_argument("--size", default="360x640", help="HxW")
    demo.add_argument("--fps", type=float, default=24)
    args = parser.parse_args(argv)
    size = tuple(int(x) for x in args.size.lower().split("x"))
    t0 = time.perf_counter()
    if args.cmd == "dataset":
        out = generate_dataset(
            args.out_dir,
            seed=args.seed,
            n=args.n,
            video_share=args.video_share,
            question_style=args.question_style,
            size=size,
            fps=args.fps,
            duration=args.duration,
            max_objects=args.max_objects,
            text_prob=args.text_prob,
            object_scale=args.object_scale,
            per_sample=args.per_sample,
            qtypes=args.qtypes,
            workers=args.workers,
        )
        dt = time.perf_counter() - t0
        print(f"{out}: {args.n} samples in {dt:.1f} s ({args.n / dt:.1f} samples/s)")
    else:
        make_demo_video(args.path, seed=args.seed, duration=args.duration, size=size, fps=args.fps)
        print(f"{args.path}: {args.duration} s {args.size} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
