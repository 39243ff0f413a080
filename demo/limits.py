"""What one demo server accepts and runs at once: light (no Gradio), so `keye demo --help` and its config load fast."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Limits"]


@dataclass
class Limits:
    """What one demo server accepts and how many requests it runs at once."""

    max_upload_mb: float = 200.0  # per file; also Gradio's own upload limit
    max_duration_s: float = 600.0  # longest video accepted
    concurrency: int = 1  # generations running at once (they share one model)
    queue_size: int = 16  # requests waiting beyond that; more are refused with "queue full"
    max_new_tokens: int = 1024  # upper end of the slider
