"""The run loop with a scripted predictor: hand-worked metrics, resume after a kill, failed videos, one prepare per
video, the subtitle setting end to end, MLVU's averages and judge, reports, compare and the CLI."""

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import pytest

from keye.errors import KeyeInputError
from keye.eval.mlvu import MLVU
from keye.eval.report import compare
from keye.eval.runner import EvalSettings, read_samples, run
from keye.eval.testing import ScriptedPredictor, SimulatedKill, hash_policy, table_policy, write_test_videos
from keye.eval.videomme import VideoMME

FIXTURES = Path(__file__).parent / "fixtures" / "eval"

# Scripted answers to the Video-MME fixture (targets: 001 C A B, 002 A B D; videos 003 missing, 004 corrupt).
VIDEOMME_ANSWERS = {
    "which kind of the decoration has the largest number?": "The answer is (C).",  # right
    "What is the genre of this video?": "B. It is a documentary on the evolution of Christmas holiday recipes.",
    "Why does the narrator mention apples": "I think A or B",  # unparsed
    "What does the rabbit do after the bell rings?": "**A**",  # right
    "Which event happens first in the video?": "<think>The fox comes in before the bell.</think>\nb",  # right
    "What word is written on the sign?": "Stop.",  # right, by the option's text
}


@pytest.fixture(scope="module")
def videomme_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "videomme"
    shutil.copytree(FIXTURES / "videomme", root)
    write_test_videos(root, ["data/fFjv93ACGo8.mp4", "data/Wb7IO5GcxQ4.mp4"])
    (root / "data" / "corrupt0001.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(300))  # not a video
    return root


@pytest.fixture(scope="module")
def mlvu_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench") / "mlvu"
    shutil.copytree(FIXTURES / "mlvu", root)
    videos = [
        "1_plotQA/movie101_66.mp4",
        "4_count/count_12.mp4",
        "5_order/order_126.mp4",
        "5_order/order_214.mp4",
    ]
    write_test_videos(root / "video", videos + ["9_summary/217.mp4"])
    return root


def scripted(**kwargs) -> ScriptedPredictor:
    return ScriptedPredictor(table_policy(VIDEOMME_ANSWERS), **kwargs)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_videomme_metrics_hand_worked(videomme_dir, tmp_path):
    results = run(VideoMME(videomme_dir), scripted(), tmp_path / "out", progress=False, report=False)
    m = results["metrics"]
    # 4 right of 12 (6 failed); 5 answers parsed, 4 of them right.
    assert m["summary"]["accuracy"] == pytest.approx(100 * 4 / 12)
    assert m["summary"]["accuracy_over_parsed"] == pytest.approx(80.0)
    assert m["overall"] == {"acc": pytest.approx(100 * 4 / 12), "correct": 4, "total": 12}
    duration = m["groups"]["duration"]
    assert list(duration) == ["short", "medium", "long"]  # the benchmark's order
    assert duration["short"] == {
        "acc": pytest.approx(100 / 6),
        "correct": 1,
        "total": 6,
    }  # 001 (1/3) + 004 (0/3)
    assert duration["medium"]["acc"] == 100.0 and duration["long"]["acc"] == 0.0
    assert m["groups"]["domain"]["Knowledge"]["correct"] == 1
    assert m["groups"]["task_type"]["Counting Problem"] == {
        "acc": 50.0,
        "correct": 1,
        "total": 2,
    }  # 001-1, 003-3
    assert m["groups"]["sub_category"]["Animation"]["acc"] == 100.0
    assert results["counts"] == {
        "questions": 12,
        "answered": 6,
        "failed": 6,
        "failed_videos": 2,
        "unparsed": 1,
    }

    records = {r["question_id"]: r for r in lines(tmp_path / "out" / "samples.jsonl")}
    assert list(records) == [f"00{v}-{k}" for v in range(1, 5) for k in range(1, 4)]
    r = records["002-2"]
    assert (
        r["response"].endswith("b") and r["extracted"] == "B" and r["correct"] is True and r["target"] == "B"
    )
    assert r["duration"] == "medium" and r["video"] == "data/Wb7IO5GcxQ4.mp4" and r["error"] is None
    assert records["001-3"]["extracted"] is None and records["001-3"]["correct"] is False


def test_failed_videos_are_recorded_and_the_run_goes_on(videomme_dir, tmp_path):
    predictor = scripted()
    results = run(VideoMME(videomme_dir), predictor, tmp_path / "out", progress=False, report=False)
    reasons = {f["video"]: f["reason"] for f in results["failures"]}
    assert (
        reasons["data/missing0001.mp4"].startswith("VideoDecodeError: ")
        and "no such file" in reasons["data/missing0001.mp4"]
    )
    assert "cannot open as a video" in reasons["data/corrupt0001.mp4"]
    records = lines(tmp_path / "out" / "samples.jsonl")
    failed = [r for r in records if r["error"]]
    assert [r["question_id"] for r in failed] == ["003-1", "003-2", "003-3", "004-1", "004-2", "004-3"]
    assert all(r["correct"] is False and r["response"] is None for r in failed)
    assert predictor.answer_calls == 6  # the questions of the two good videos, nothing more


def test_each_video_is_prepared_once(videomme_dir, tmp_path):
    predictor = scripted()
    results = run(VideoMME(videomme_dir), predictor, tmp_path / "once", progress=False, report=False)
    assert dict(predictor.prepare_calls) == {
        "fFjv93ACGo8.mp4": 1,
        "Wb7IO5GcxQ4.mp4": 1,
        "missing0001.mp4": 1,
        "corrupt0001.mp4": 1,
    }
    assert results["timing"]["prepare_calls"] == 4 and results["timing"]["answer_calls"] == 6
    # The ablation prepares per question, with the same answers.
    ablation = scripted()
    again = run(
        VideoMME(videomme_dir),
        ablation,
        tmp_path / "each",
        settings=EvalSettings(reuse_video=False),
        progress=False,
        report=False,
    )
    assert ablation.prepare_calls["fFjv93ACGo8.mp4"] == 3
    assert again["metrics"] == results["metrics"]


def test_resume_after_kill_matches_an_uninterrupted_run(videomme_dir, tmp_path):
    full = run(
        VideoMME(videomme_dir),
        ScriptedPredictor(hash_policy),
        tmp_path / "full",
        progress=False,
        report=False,
    )

    out = tmp_path / "killed"
    with pytest.raises(SimulatedKill):
        run(
            VideoMME(videomme_dir),
            ScriptedPredictor(hash_policy, kill_after=4),
            out,
            progress=False,
            report=False,
        )
    assert [r["question_id"] for r in lines(out / "samples.jsonl")] == ["001-1", "001-2", "001-3", "002-1"]
    with (out / "samples.jsonl").open("a") as f:  # the kill also tore the line being written
        f.write('{"question_id": "002-2", "vid')

    second = ScriptedPredictor(hash_policy)
    resumed = run(VideoMME(videomme_dir), second, out, progress=False, report=False)
    assert second.answer_calls == 2  # 002-2 and 002-3 only
    assert "fFjv93ACGo8.mp4" not in second.prepare_calls  # a finished video is not decoded again
    assert resumed["timing"]["resumed_questions"] == 4
    assert resumed["metrics"] == full["metrics"] and resumed["counts"] == full["counts"]

    def answers(path):
        return [
            (r["question_id"], r["response"], r["extracted"], r["correct"], r["error"]) for r in lines(path)
        ]

    assert answers(out / "samples.jsonl") == answers(tmp_path / "full" / "samples.jsonl")

    # A third run finds everything done and asks nothing.
    third = ScriptedPredictor(hash_policy)
    assert run(VideoMME(videomme_dir), third, out, progress=False, report=False)["metrics"] == full["metrics"]
    assert third.answer_calls == 0 and not third.prepare_calls


def test_torn_and_corrupt_logs(tmp_path):
    log = tmp_path / "samples.jsonl"
    # A last line without its newline was cut by a kill, even when it parses: it is asked again.
    log.write_text('{"question_id": "a"}\n{"question_id": "b"}')
    assert list(read_samples(tmp_path)) == ["a"]
    log.write_text('{"question_id": "a"}\n{"question_id": \n{"question_id": "c"}\n')
    with pytest.raises(KeyeInputError, match="samples.jsonl: line 2 is not JSON"):
        read_samples(tmp_path)


def test_limit_then_extend_and_settings_guard(videomme_dir, tmp_path):
    out = tmp_path / "out"
    first = run(VideoMME(videomme_dir), ScriptedPredictor(), out, limit=4, progress=False, report=False)
    assert first["counts"]["questions"] == 4 and first["settings"]["limit"] == 4
    second = ScriptedPredictor()
    run(VideoMME(videomme_dir), second, out, progress=False, report=False)
    assert second.answer_calls == 2 and len(read_samples(out)) == 12
    with pytest.raises(KeyeInputError, match=r"differs in \['settings'\]"):
        run(
            VideoMME(videomme_dir),
            ScriptedPredictor(),
            out,
            settings=EvalSettings(fps=1.0),
            progress=False,
            report=False,
        )


def test_subtitle_setting_end_to_end(videomme_dir, tmp_path):
    predictor = scripted()
    run(
        VideoMME(videomme_dir, use_subtitles=True),
        predictor,
        tmp_path / "subs",
        settings=EvalSettings(fps=2.0),
        progress=False,
        report=False,
    )
    # The scripted predictor samples 2 fps over the 4 s clip: frames at 0, 0.5, ..., 3.5 s.
    assert predictor.prompts[0] == (FIXTURES / "prompts" / "videomme_subs_001-1.txt").read_text()
    assert predictor.prompts[3] == (FIXTURES / "prompts" / "videomme_subs_002-1.txt").read_text()


class KeywordJudge:
    name = "keyword-judge"

    def __init__(self):
        self.calls = []

    def score(self, *, task, question, reference, prediction, scoring_points):
        self.calls.append(task)
        return 7.0 if "boat" in prediction else 2.0


MLVU_ANSWERS = {
    "What color is the main male character": "A",  # right
    "What does the main male character carry": "B) An umbrella",  # wrong (C)
    "how many times does the action": "(D)",  # wrong (C)
    "(1)Woman tapes her hands": "D",  # right
    "order of events as they occur": "A) abseiling --> making jewelry --> milking cow --> cleaning toilet",  # right
    "Please summarize this video": "Waves hit the rocks, then two men sail a boat.",
}


def test_mlvu_averages_both_ways_and_judge(mlvu_dir, tmp_path):
    predictor = ScriptedPredictor(table_policy(MLVU_ANSWERS))
    results = run(MLVU(mlvu_dir), predictor, tmp_path / "nojudge", progress=False, report=False)
    s = results["metrics"]["summary"]
    per_task = results["metrics"]["groups"]["task"]
    assert {t: e["acc"] for t, e in per_task.items()} == {"plotQA": 50.0, "count": 0.0, "order": 100.0}
    assert s["m_avg_macro"] == pytest.approx(50.0)  # (50 + 0 + 100) / 3
    assert s["m_avg_micro"] == pytest.approx(60.0)  # 3 of 5 questions
    assert s["m_avg_micro_without_order"] == pytest.approx(100 / 3)  # 1 of 3
    assert s["g_avg"] is None and "no judge" in results["metrics"]["definitions"]["g_avg"]
    assert "macro" in results["metrics"]["definitions"]["m_avg_macro"]
    summary = [r for r in lines(tmp_path / "nojudge" / "samples.jsonl") if r["kind"] == "generation"]
    assert summary[0]["response"].startswith("Waves") and summary[0]["judge_score"] is None
    assert predictor.prepare_calls["movie101_66.mp4"] == 1  # two plotQA questions, one video

    judge = KeywordJudge()
    judged = run(
        MLVU(mlvu_dir, judge=judge),
        ScriptedPredictor(table_policy(MLVU_ANSWERS)),
        tmp_path / "judged",
        progress=False,
        report=False,
    )
    assert judge.calls == ["summary"]
    assert judged["metrics"]["summary"]["g_avg"] == 7.0
    assert judged["task_config"]["judge"] == "keyword-judge"


def test_report_and_compare(videomme_dir, tmp_path):
    a = run(VideoMME(videomme_dir), scripted(), tmp_path / "a", progress=False)
    b = run(
        VideoMME(videomme_dir), ScriptedPredictor(hash_policy, name="other"), tmp_path / "b", progress=False
    )
    report = (tmp_path / "a" / "report.md").read_text()
    assert "## By duration" in report and "![duration](figures/duration.png)" in report
    assert "data/missing0001.mp4" in report
    for group in ("duration", "domain", "sub_category", "task_type"):
        assert (tmp_path / "a" / "figures" / f"{group}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = a["timing"]
    assert timing["harness_overhead_s"] == pytest.approx(timing["process_s"] - timing["predictor_s"])
    assert 0.0 <= timing["harness_overhead_frac"] <= 1.0
    assert a["versions"]["python"] and "report_s" in a["timing"]

    table = compare(tmp_path / "a", tmp_path / "b")
    row = next(line for line in table.splitlines() if line.startswith("| summary/accuracy |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    expected_delta = b["metrics"]["summary"]["accuracy"] - a["metrics"]["summary"]["accuracy"]
    assert cells == [
        "summary/accuracy",
        "33.3",
        f"{b['metrics']['summary']['accuracy']:.1f}",
        f"{expected_delta:+.1f}",
    ]


def test_cli_synthetic_and_compare(tmp_path, monkeypatch, capsys):
    from keye.eval.cli import add_parser

    made = []

    def make_predictor(model_name):
        made.append(model_name)
        return ScriptedPredictor(name=model_name)

    monkeypatch.setitem(
        sys.modules, "keye.eval.keye_predictor", types.SimpleNamespace(make_predictor=make_predictor)
    )
    parser = argparse.ArgumentParser(prog="keye")
    add_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "syn"
    args = parser.parse_args(
        ["eval", "synthetic", "--seed", "0", "--n", "7", "--out", str(out), "--fps", "1", "--no-progress"]
    )
    assert args.func(args) == 0
    assert made == ["keye-tiny"]
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "synthetic" and results["counts"]["questions"] == 7
    assert results["settings"]["fps"] == 1.0 and results["task_config"]["seed"] == 0
    assert (out / "benchmark" / "videomme" / "test-00000-of-00001.parquet").is_file()
    assert "synthetic keye-tiny: accuracy" in capsys.readouterr().out

    args = parser.parse_args(["eval", "compare", str(out), str(out)])
    assert args.func(args) == 0
    assert "| summary/accuracy |" in capsys.readouterr().out
