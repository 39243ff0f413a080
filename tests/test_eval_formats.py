"""Readers and prompts of the published benchmark formats (Video-MME parquet + SRT, MLVU JSON) and the synthetic
benchmark writer, on committed fixtures in the exact published layouts."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from keye.errors import KeyeInputError
from keye.eval.mlvu import MLVU, read_mlvu
from keye.eval.synthetic import TASK_TYPES, Synthetic, write_synthetic_videomme
from keye.eval.task import GENERATION, MC, get_task
from keye.eval.videomme import COLUMNS, VideoMME, parse_srt, read_videomme, select_subtitles

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
PROMPTS = FIXTURES / "prompts"


def snapshot(name: str) -> str:
    return (PROMPTS / name).read_text(encoding="utf-8")


def test_videomme_fixture_has_the_published_schema():
    schema = pq.read_schema(FIXTURES / "videomme" / "videomme" / "test-00000-of-00001.parquet")
    assert tuple(schema.names) == COLUMNS
    assert str(schema.field("options").type) == "list<element: string>"


def test_read_videomme():
    rows = read_videomme(FIXTURES / "videomme")
    assert len(rows) == 12
    first = rows[0]
    assert first["question_id"] == "001-1" and first["videoID"] == "fFjv93ACGo8" and first["answer"] == "C"
    assert first["options"] == [
        "A. Apples.",
        "B. Candles.",
        "C. Berries.",
        "D. The three kinds are of the same number.",
    ]
    questions = VideoMME(FIXTURES / "videomme").load()
    assert [q.question_id for q in questions][:4] == ["001-1", "001-2", "001-3", "002-1"]
    assert questions[0].video == "data/fFjv93ACGo8.mp4"
    assert dict(questions[0].fields) == {
        "duration": "short",
        "domain": "Knowledge",
        "sub_category": "Humanity & History",
        "task_type": "Counting Problem",
    }


def test_read_videomme_rejects_bad_files(tmp_path):
    with pytest.raises(KeyeInputError, match="no Video-MME parquet"):
        read_videomme(tmp_path)
    frame = pd.read_parquet(FIXTURES / "videomme" / "videomme" / "test-00000-of-00001.parquet")
    frame.drop(columns=["task_type"]).to_parquet(tmp_path / "broken.parquet")
    with pytest.raises(KeyeInputError, match=r"broken.parquet: missing Video-MME columns \['task_type'\]"):
        read_videomme(tmp_path)
    frame.loc[0, "answer"] = "E"
    frame.to_parquet(tmp_path / "broken.parquet")
    with pytest.raises(KeyeInputError, match="answer 'E'"):
        read_videomme(tmp_path)


def test_parse_srt_and_select_at_frames():
    subs = parse_srt(FIXTURES / "videomme" / "subtitle" / "fFjv93ACGo8.srt")
    assert subs == [
        (0.0, 1.2, "Hi guys, welcome back."),
        (1.2, 1.4, "This cue falls between two sampled frames."),
        (2.0, 3.0, "Today we decorate the tree."),
        (3.0, 4.0, "Apples, candles & berries."),
    ]
    # [start, end): a frame at 3.0 shows cue 4, not cue 3; each cue once; in time order whatever the frame order.
    assert select_subtitles(subs, [3.0, 0.1, 0.9]) == ["Hi guys, welcome back.", "Apples, candles & berries."]
    assert select_subtitles(subs, [1.3]) == ["This cue falls between two sampled frames."]
    assert select_subtitles(subs, [5.0]) == []


def test_videomme_prompt_snapshots():
    task = VideoMME(FIXTURES / "videomme")
    questions = task.load()
    assert task.prompt(questions[0], None) == snapshot("videomme_001-1.txt")
    with_subs = VideoMME(FIXTURES / "videomme", use_subtitles=True)
    frame_times = [0.5 * i for i in range(8)]  # 2 fps over 4 s
    assert with_subs.prompt(questions[0], frame_times) == snapshot("videomme_subs_001-1.txt")
    assert with_subs.prompt(questions[3], frame_times) == snapshot("videomme_subs_002-1.txt")  # no .srt file


def test_read_mlvu_and_targets():
    files = read_mlvu(FIXTURES / "mlvu")
    assert [(stem, task) for stem, task, _ in files] == [
        ("1_plotQA", "plotQA"),
        ("4_count", "count"),
        ("5_order", "order"),
        ("9_summary", "summary"),
    ]
    questions = MLVU(FIXTURES / "mlvu").load()
    by_id = {q.question_id: q for q in questions}
    assert by_id["1_plotQA/1"].target == "C"  # "A sword" is the third candidate
    assert by_id["1_plotQA/1"].video == "video/1_plotQA/movie101_66.mp4"
    assert by_id["4_count/0"].target == "C" and by_id["4_count/0"].options[2] == "C. 2"  # integer candidates
    assert by_id["9_summary/0"].kind == GENERATION and by_id["9_summary/0"].options == ()
    assert by_id["5_order/0"].kind == MC and by_id["5_order/0"].fields["task"] == "order"


def test_mlvu_prompt_snapshots():
    task = MLVU(FIXTURES / "mlvu")
    by_id = {q.question_id: q for q in task.load()}
    assert task.prompt(by_id["1_plotQA/0"], None) == snapshot("mlvu_1_plotQA-0.txt")
    assert task.prompt(by_id["4_count/0"], None) == snapshot("mlvu_4_count-0.txt")
    assert task.prompt(by_id["9_summary/0"], None) == snapshot("mlvu_9_summary-0.txt")
    assert task.prompt(by_id["1_plotQA/0"], None).endswith("Best Option: (")


def test_read_mlvu_rejects_an_answer_outside_the_candidates(tmp_path):
    shutil.copytree(FIXTURES / "mlvu", tmp_path / "mlvu")
    path = tmp_path / "mlvu" / "json" / "1_plotQA.json"
    entries = json.loads(path.read_text())
    entries[1]["answer"] = "A spoon"
    path.write_text(json.dumps(entries))
    with pytest.raises(KeyeInputError, match=r"1_plotQA.json: entry 1: answer 'A spoon'"):
        read_mlvu(tmp_path / "mlvu")


def test_synthetic_benchmark_is_videomme_format(tmp_path):
    root = write_synthetic_videomme(tmp_path / "syn", seed=3, n=8, size=(64, 64), fps=4, duration=2.0)
    schema = pq.read_schema(root / "videomme" / "test-00000-of-00001.parquet")
    assert tuple(schema.names) == COLUMNS
    rows = read_videomme(root)
    assert len(rows) == 8
    assert {r["task_type"] for r in rows} <= set(TASK_TYPES.values())
    assert all(r["duration"] == "short" and r["domain"] == "Synthetic" for r in rows)
    assert [r["question_id"] for r in rows][:2] == ["001-1", "001-2"]
    for r in rows:
        assert (root / "data" / f"{r['videoID']}.mp4").is_file()
        assert r["answer"] in "ABCD" and len(r["options"]) == 4
    # Deterministic and idempotent; another benchmark in the same folder is refused.
    again = write_synthetic_videomme(tmp_path / "syn2", seed=3, n=8, size=(64, 64), fps=4, duration=2.0)
    assert read_videomme(again) == [{**r} for r in rows]
    assert write_synthetic_videomme(root, seed=3, n=8, size=(64, 64), fps=4, duration=2.0) == root
    with pytest.raises(FileExistsError):
        write_synthetic_videomme(root, seed=4, n=8, size=(64, 64), fps=4, duration=2.0)


def test_synthetic_benchmark_difficulty_knobs(tmp_path):
    kw = dict(seed=3, n=12, size=(64, 64), fps=4, duration=2.0)
    easy = dict(max_objects=1, text_prob=0.0, object_scale=(0.3, 0.42))
    root = write_synthetic_videomme(tmp_path / "easy", **easy, **kw)
    manifest = json.loads((root / "synthetic.json").read_text())
    assert manifest["max_objects"] == 1 and manifest["text_prob"] == 0.0
    assert manifest["object_scale"] == [0.3, 0.42]
    rows = read_videomme(root)
    assert all(r["task_type"] != TASK_TYPES["text"] for r in rows)  # no on-screen text, no text questions
    counts = [r for r in rows if r["task_type"] == TASK_TYPES["count"]]
    assert counts and all(r["options"][ord(r["answer"]) - 65].endswith(" 1") for r in counts)
    with pytest.raises(FileExistsError):  # the same folder at another difficulty is refused
        write_synthetic_videomme(root, **kw)
    with pytest.raises(FileExistsError):
        write_synthetic_videomme(root, **{**easy, "object_scale": (0.16, 0.24)}, **kw)
    assert write_synthetic_videomme(root, **easy, **kw) == root


def test_registry_builds_every_task(tmp_path):
    assert isinstance(get_task("videomme", data=FIXTURES / "videomme"), VideoMME)
    assert isinstance(get_task("mlvu", data=FIXTURES / "mlvu"), MLVU)
    synthetic = get_task("synthetic", seed=0, n=3, data=tmp_path / "s")
    assert isinstance(synthetic, Synthetic)
    assert synthetic.config() == {
        "seed": 0,
        "n": 3,
        "data": str(tmp_path / "s"),
        "size": [112, 112],
        "fps": 8,
        "duration": 4.0,
    }
    with pytest.raises(KeyError, match="unknown task"):
        get_task("nope")


def test_eval_synthetic_cli_passes_the_difficulty_knobs(tmp_path):
    import argparse

    from keye.eval.cli import _build_task, add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(
        ["eval", "synthetic", "--seed", "3", "--n", "4", "--max-objects", "1", "--text-prob", "0",
         "--object-scale", "0.3", "0.42", "--data", str(tmp_path / "bench")]
    )  # fmt: skip
    task = _build_task(args, tmp_path)
    assert len(task.load()) == 4
    manifest = json.loads((tmp_path / "bench" / "synthetic.json").read_text())
    assert (manifest["max_objects"], manifest["text_prob"], manifest["object_scale"]) == (1, 0.0, [0.3, 0.42])
    assert task.config()["object_scale"] == [0.3, 0.42]
