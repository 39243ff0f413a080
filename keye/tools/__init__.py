"""Thyme-style tools: run model-written Python on images in an isolated sandbox.

- `run_snippet`, `SandboxConfig`, `SandboxResult`, `isolation_report` (`keye.tools.sandbox`): run one snippet;
- `parse_turn`, `format_sandbox_output` (`keye.tools.protocol`): the ``<think>/<code>/<answer>`` turn format;
- `repair_code` (`keye.tools.repair`): fix common slips (missing imports, wrong image path) before running.

Standard library only at import time (PIL is imported lazily): the sandbox must start fast and never loads the
model, torch or transformers. The model loop and RL live elsewhere.
"""

from keye.tools.protocol import ParsedTurn, format_sandbox_output, parse_turn
from keye.tools.repair import repair_code
from keye.tools.sandbox import (
    SandboxConfig,
    SandboxResult,
    SandboxUnavailableError,
    isolation_report,
    run_snippet,
)

__all__ = [
    "ParsedTurn",
    "SandboxConfig",
    "SandboxResult",
    "SandboxUnavailableError",
    "format_sandbox_output",
    "isolation_report",
    "parse_turn",
    "repair_code",
    "run_snippet",
]
