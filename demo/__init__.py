"""Gradio chat demo; a client of keye's public API."""
