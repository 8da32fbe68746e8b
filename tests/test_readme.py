"""The README's model example runs as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_model_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  namespace: dict = {}
  exec(blocks[0], namespace)  # noqa: S102 - our own documentation
  assert namespace["logits"].shape == (1, 4, 1000)


def test_readme_opens_with_the_two_commands():
  text = README.read_text()
  quick = text[text.index("## Quick start"):]
  commands = re.findall(r"^bash (scripts/\S+)", quick, re.M)[:2]
  assert commands == ["scripts/run.sh", "scripts/test.sh"]
  assert "scripts/test.sh" in (README.parent / ".ci" / "run").read_text()
