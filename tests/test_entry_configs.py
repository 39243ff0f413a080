"""One config system for the entry points that are not training recipes: ``keye eval`` and ``keye demo`` read the same
YAML + dotted overrides (`keye.config`) as the recipes, their flags are generated from the same dataclasses, and the
precedence is file < overrides < flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from keye.config import load
from keye.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "eval").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_eval_configs_load(path):
    from keye.eval.cli import EvalConfig

    cfg = load(EvalConfig, path)
    assert cfg.model and cfg.settings().compress == cfg.compress


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "demo").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_demo_configs_load(path):
    from keye.demo.cli import DemoConfig

    cfg = load(DemoConfig, path)
    assert cfg.model == "keye-tiny" and cfg.limits.queue_size >= 1


def _parse(add_parser, argv):
    parser = argparse.ArgumentParser(prog="keye")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_eval_config_file_then_overrides_then_flags(tmp_path):
    from keye.eval.cli import add_parser, eval_config

    yaml_file = tmp_path / "e.yaml"
    yaml_file.write_text("model: m-file\nfps: 1.0\nmax_frames: 8\nthink: true\nlimit: 5\n")
    args = _parse(
        add_parser,
        ["eval", "synthetic", "--seed", "0", "--n", "3", "--config", str(yaml_file), "max_frames=4",
         "compress=dyntok", "--max-frames", "2", "--no-think", "--prepare-per-question"],
    )  # fmt: skip
    cfg = eval_config(args)
    assert (cfg.model, cfg.fps, cfg.limit) == ("m-file", 1.0, 5)  # the file
    assert cfg.compress == "dyntok"  # an override
    assert (cfg.max_frames, cfg.think, cfg.reuse_video) == (2, False, False)  # flags win
    settings = cfg.settings()
    assert type(settings).__name__ == "EvalSettings" and settings.max_frames == 2
    # no file: the defaults, and a flag per EvalSettings field
    plain = eval_config(
        _parse(add_parser, ["eval", "mlvu", "--data", str(tmp_path), "--token-budget", "512"])
    )
    assert (plain.model, plain.token_budget, plain.reuse_video, plain.progress) == (
        "keye-tiny",
        512,
        True,
        True,
    )


def test_eval_config_errors_name_the_key_and_the_file(tmp_path):
    from keye.eval.cli import add_parser, eval_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("frames: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*unknown key\(s\) \['frames'\]"):
        eval_config(_parse(add_parser, ["eval", "mlvu", "--data", str(tmp_path), "--config", str(bad)]))
    with pytest.raises(ConfigError, match="compress: must be one of none, dyntok, clapper"):
        eval_config(_parse(add_parser, ["eval", "mlvu", "--data", str(tmp_path), "--compress", "zip"]))


def test_keye_eval_bad_config_is_one_line_exit_2(tmp_path, capsys):
    from keye.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("max_frames: many\n")
    assert main(["eval", "mlvu", "--data", str(tmp_path), "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "max_frames" in err


def test_demo_config_file_then_overrides_then_flags(tmp_path):
    from keye.demo.cli import add_parser, demo_config

    yaml_file = tmp_path / "d.yaml"
    yaml_file.write_text("port: 8000\nlimits: {queue_size: 4, max_duration_s: 30}\n")
    args = _parse(
        add_parser,
        ["demo", "--config", str(yaml_file), "limits.concurrency=2", "--max-duration", "12", "--share"],
    )
    cfg = demo_config(args)
    assert (cfg.port, cfg.limits.queue_size) == (8000, 4)  # the file
    assert cfg.limits.concurrency == 2  # an override
    assert (cfg.limits.max_duration_s, cfg.share, cfg.model) == (12.0, True, "keye-tiny")  # flags, defaults
