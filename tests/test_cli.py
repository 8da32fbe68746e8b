"""Script flags: a mistyped, unknown or ill-typed `--config.x`, or a recipe argument it refuses, is one line."""

from __future__ import annotations

import os
import sys

import pytest
from absl import flags

from gemma_jax import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(REPO, "configs", "orpo_gemma3_270m_cpu.py")


def define_and_parse(monkeypatch, *args, recipe=RECIPE):
  argv = ["train", *args]
  monkeypatch.setattr(sys, "argv", argv)
  fv = flags.FlagValues()
  holder = cli.define_config_file("config", recipe, "run config", flag_values=fv)
  cli.parse_flags(argv, flag_values=fv)
  return holder.value


def one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


@pytest.mark.parametrize("args,expected", [
    (["--config.optim.lrr=1"], "--config.optim.lrr: the run config has no field 'lrr'; did you mean 'lr'?"),
    (["--config.seed=abc"], "--config.seed=abc: invalid literal for int()"),
    (["--config=" + os.path.join(REPO, "configs", "finetune.py") + ":foo=1"], "bad argument 'foo=1'"),
    (["--config.model_overrides.num_layerz=2"], "has no field 'num_layerz'; did you mean 'num_layers'?"),
])
def test_bad_config_flags_are_one_line(monkeypatch, capsys, args, expected):
  with pytest.raises(SystemExit) as e:
    define_and_parse(monkeypatch, *args)
  assert e.value.code == cli.USAGE_STATUS
  assert expected in one_error_line(capsys)


def test_model_overrides_are_typed_fields(monkeypatch):
  c = define_and_parse(monkeypatch, "--config.model_overrides.num_layers=2",
                       "--config.model_overrides.final_logit_soft_cap=30")
  assert c.model_overrides.num_layers == 2 and c.model_overrides.final_logit_soft_cap == 30.0
  assert c.model_overrides.embed_dim is None  # unset fields stay None: not applied
  from gemma_jax.training.run_config import model_overrides
  assert model_overrides(c) == {"num_layers": 2, "final_logit_soft_cap": 30.0}
