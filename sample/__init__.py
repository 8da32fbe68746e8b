"""Sampling scripts: `python -m sample.sample` (completion) and `python -m sample.chat` (interactive chat)."""
