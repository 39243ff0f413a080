"""``keye serve``: `add_parser` hangs it under keye's CLI; flags are generated from `ServeConfig`.

    keye serve [--model keye-tiny] [--host 127.0.0.1] [--port 8000] [--allowed-local-media-path DIR]
               [--allowed-media-domains HOST ...] [--max-upload-mb 200] [--max-batch 8] [--queue-size 16]
               [--max-tokens 1024] [--config FILE] [key=value ...]

FastAPI and the model are imported only when the command runs, so ``keye --help`` stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

from keye.config import load
from keye.flags import add_flags, given

__all__ = ["ServeConfig", "add_parser"]


@dataclass
class ServeConfig:
    """A ``keye serve`` server (flags generated from these fields)."""

    model: str = "keye-tiny"  # model name or folder
    host: str = "127.0.0.1"
    port: int = 8000
    allowed_local_media_path: str | None = None  # local files under this folder may be sent by path
    allowed_media_domains: list[str] | None = None  # hosts whose http(s) media urls are fetched
    max_upload_mb: float = 200.0  # one decoded upload; the request body may be a third larger (base64)
    max_batch: int = 8  # requests decoded together
    queue_size: int = 16  # requests waiting for a place in the batch; more get 429
    max_tokens: int = 1024  # cap on a request's max_tokens
    prefix_cache_size: int = 8  # media prefixes (and planned videos) kept


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="serve a model over the OpenAI chat completions API")
    p.add_argument("--config", metavar="FILE", help="YAML of ServeConfig fields")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (after --config)")
    add_flags(p, ServeConfig)
    p.set_defaults(func=_serve)
    return p


def _serve(args: argparse.Namespace) -> int:
    from keye.serve.app import run

    cfg = replace(load(ServeConfig, args.config, args.overrides), **given(args, ServeConfig))
    try:
        run(cfg)
    except KeyboardInterrupt:
        return 130
    return 0
