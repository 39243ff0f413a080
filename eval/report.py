"""Human-readable views of a finished run: ``OUT/report.md`` with tables and PNG bar charts per category, and
`compare` that puts two runs side by side.

Both read only ``results.json`` (plus the figures they write), so they work on any finished run folder.

Not for computing metrics (the tasks do that).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["compare", "load_results", "write_report"]


def load_results(out_dir: str | Path) -> dict[str, Any]:
    """The ``results.json`` of a run folder."""
    from keye.errors import KeyeInputError

    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise KeyeInputError(out_dir, "no results.json (not a finished eval run)")
    return json.loads(path.read_text(encoding="utf-8"))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _score_key(entry: Mapping[str, Any]) -> str:
    return "acc" if "acc" in entry else "score"


def _bar_chart(path: Path, title: str, group: Mapping[str, Mapping[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    names = list(group)
    key = _score_key(next(iter(group.values())))
    values = [group[n][key] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(names)))
    bars = ax.barh(range(len(names)), values, color="#4878a8")
    ax.set_yticks(range(len(names)), [f"{n} (n={group[n]['total']})" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100 if key == "acc" else 10)
    ax.set_xlabel("accuracy (%)" if key == "acc" else "judge score (0-10)")
    ax.set_title(title, fontsize=10)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str | Path, results: Mapping[str, Any] | None = None) -> Path:
    """Write ``OUT/report.md`` and ``OUT/figures/<category>.png`` for a run; return the report's path."""
    out = Path(out_dir)
    results = results if results is not None else load_results(out)
    metrics = results["metrics"]
    settings = results["settings"]
    counts = results["counts"]
    timing = results["timing"]
    parts = [
        f"# {results['task']}: {results['model']}",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()),
        "",
        "Task: " + ", ".join(f"{k}={v}" for k, v in results["task_config"].items()),
        "",
        "## Summary",
        "",
        _table(
            ["metric", "value", "definition"],
            [[k, v, metrics["definitions"].get(k, "")] for k, v in metrics["summary"].items()],
        ),
        "",
        "## Questions",
        "",
        _table(
            ["questions", "answered", "failed", "failed videos", "unparsed answers"],
            [
                [
                    counts["questions"],
                    counts["answered"],
                    counts["failed"],
                    counts["failed_videos"],
                    counts["unparsed"],
                ]
            ],
        ),
        "",
        "Failed and unparsed questions count as wrong in every metric.",
    ]
    if results["failures"]:
        parts += [
            "",
            "### Failed videos",
            "",
            _table(["video", "reason"], [[f["video"], f["reason"]] for f in results["failures"]]),
        ]
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    for name, group in metrics["groups"].items():
        if not group:
            continue
        key = _score_key(next(iter(group.values())))
        label = "accuracy (%)" if key == "acc" else "mean judge score"
        rows = [[n, e[key], e["correct"] if key == "acc" else "-", e["total"]] for n, e in group.items()]
        _bar_chart(figures / f"{name}.png", f"{results['task']} by {name}: {results['model']}", group)
        parts += [
            "",
            f"## By {name}",
            "",
            _table([name, label, "correct", "total"], rows),
            "",
            f"![{name}](figures/{name}.png)",
        ]
    parts += [
        "",
        "## Timing",
        "",
        _table(
            [
                "wall s",
                "predictor s",
                "harness overhead s",
                "harness overhead %",
                "prepare calls",
                "answer calls",
                "resumed",
            ],
            [
                [
                    timing["wall_s"],
                    timing["predictor_s"],
                    timing["harness_overhead_s"],
                    100.0 * timing["harness_overhead_frac"],
                    timing["prepare_calls"],
                    timing["answer_calls"],
                    timing["resumed_questions"],
                ]
            ],
        ),
        "",
        "Harness overhead: time outside predictor calls, summed over processes; timings cover this session only.",
        "",
        "## Versions",
        "",
        _table(["package", "version"], [[k, v] for k, v in results["versions"].items()]),
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _flat(results: Mapping[str, Any]) -> dict[str, Any]:
    """``{"summary/accuracy": 61.0, "duration/short": 70.0, ...}`` of a run's metrics."""
    metrics = results["metrics"]
    flat: dict[str, Any] = {f"summary/{k}": v for k, v in metrics["summary"].items()}
    for name, group in metrics["groups"].items():
        for entry_name, entry in group.items():
            flat[f"{name}/{entry_name}"] = entry[_score_key(entry)]
    flat.update({f"counts/{k}": v for k, v in results["counts"].items()})
    flat["timing/wall_s"] = results["timing"]["wall_s"]
    flat["timing/harness_overhead_%"] = 100.0 * results["timing"]["harness_overhead_frac"]
    return flat


def compare(out1: str | Path, out2: str | Path) -> str:
    """Two runs' metrics side by side (with the difference) as a Markdown table; also returned as a string."""
    r1, r2 = load_results(out1), load_results(out2)
    f1, f2 = _flat(r1), _flat(r2)
    keys = list(f1) + [k for k in f2 if k not in f1]
    rows = []
    for key in keys:
        a, b = f1.get(key), f2.get(key)
        delta = b - a if isinstance(a, int | float) and isinstance(b, int | float) else None
        rows.append([key, a, b, None if delta is None else f"{delta:+.1f}"])
    header = [
        f"run 1: {out1}",
        f"  {r1['task']} {r1['model']} " + " ".join(f"{k}={v}" for k, v in r1["settings"].items()),
        f"run 2: {out2}",
        f"  {r2['task']} {r2['model']} " + " ".join(f"{k}={v}" for k, v in r2["settings"].items()),
    ]
    if r1["task"] != r2["task"]:
        header.append(f"warning: different tasks ({r1['task']} vs {r2['task']})")
    return "\n".join(header) + "\n\n" + _table(["metric", "run 1", "run 2", "run 2 - run 1"], rows) + "\n"
