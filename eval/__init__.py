"""Benchmark harness (Video-MME, MLVU, synthetic); a client of keye's public API.

- `predictor.Predictor`: the only interface to a model (prepare a video once, answer prompts about it).
- `task.Task` and `task.get_task`: benchmarks as config dataclasses in a registry (`videomme.VideoMME`,
  `mlvu.MLVU`, `synthetic.Synthetic`).
- `runner.run(task, predictor, out_dir, settings=EvalSettings(...), limit=...)`: per-question JSONL log, resume,
  failed videos recorded, data-parallel shards merged, results.json; `report.write_report` and `report.compare`.
- `extract.extract_choice`: strict multiple-choice answer parsing.
- `cli.add_parser`: ``keye eval videomme|mlvu|synthetic|compare``.

Nothing here imports torch or transformers at module level.
"""
