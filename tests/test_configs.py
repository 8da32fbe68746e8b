"""Every run config in configs/ loads, has only known fields with valid values, and builds its optimizer;
the recipes carry the numbers they promise; the script reports config mistakes in one line."""

from __future__ import annotations

import ast
import glob
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from training_helpers import REPO, subprocess_env
from gemma_jax.cli import parse_variants
from gemma_jax.model.config import DTYPES, REMAT, TransformerConfig
from gemma_jax.model.sharding import parse_mesh_spec
from gemma_jax.templates import FAMILY_TEMPLATES, TEMPLATE_NAMES
from gemma_jax.training import optim
from gemma_jax.training.run_config import OBJECTIVES, default_config

CONFIG_DIR = os.path.join(REPO, "configs")
FILES = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))
VARIANTS = {"finetune.py": [None] + [f"objective={o},model={m}" for o in OBJECTIVES
                                     for m in ("gemma2-2b", "gemma3-1b")]}


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def flat_keys(c, prefix=""):
  out = set()
  for k, v in c.items():
    if hasattr(v, "items") and k != "model_overrides":
      out |= flat_keys(v, f"{prefix}{k}.")
    else:
      out.add(prefix + k)
  return out


CASES = [(os.path.basename(f), arg) for f in FILES for arg in VARIANTS.get(os.path.basename(f), [None])]


def test_every_config_file_is_covered():
  """Each recipe in configs/ is loaded by the cases below, and a recipe with variants has every one of them."""
  assert {name for name, _ in CASES} == {os.path.basename(f) for f in FILES}
  for name in VARIANTS:
    choices = load(os.path.join(CONFIG_DIR, name)).CHOICES
    combos = {tuple(sorted(parse_variants(arg, choices, name).items())) for arg in VARIANTS[name]}
    assert len(combos) == np.prod([len(v) for v in choices.values()]), name


def assigned_fields(path):
  """The dotted fields a recipe's get_config assigns (`c.optim.lr = ...` -> "optim.lr")."""
  tree = ast.parse(open(path).read())
  (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "get_config"]
  out = set()
  for node in ast.walk(fn):
    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute):
      parts, target = [], node.targets[0]
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      out.add(".".join(reversed(parts)))
  return out


def flat_values(c, prefix=""):
  out = {}
  for k, v in c.items():
    if hasattr(v, "items") and k != "model_overrides":
      out.update(flat_values(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


@pytest.mark.parametrize("name", [os.path.basename(f) for f in FILES])
def test_recipes_state_only_what_they_change(name):
  """A line that sets a field to its default hides what the recipe changes: none may (for some variant)."""
  module = load(os.path.join(CONFIG_DIR, name))
  default = flat_values(default_config())
  changed = set()
  for arg in VARIANTS.get(name, [None]):
    changed |= {k for k, v in flat_values(module.get_config(arg)).items() if v != default[k]}
  assert assigned_fields(os.path.join(CONFIG_DIR, name)) <= changed


@pytest.mark.parametrize("name,arg", CASES)
def test_config_is_valid(name, arg):
  c = load(os.path.join(CONFIG_DIR, name)).get_config(arg)
  assert flat_keys(c) == flat_keys(default_config()), "a recipe may only set fields the loop reads"
  assert c.objective in OBJECTIVES
  assert c.compute_dtype in DTYPES and c.param_dtype in DTYPES and c.remat in REMAT
  assert not c.data.template or c.data.template in TEMPLATE_NAMES
  assert c.batch_size % c.grad_accum == 0
  parse_mesh_spec(c.mesh, 8)
  tx, sched = optim.optimizer_from_config(c.optim, 1000)
  warmup = optim.warmup_steps(c.optim.warmup, 1000)
  assert float(sched(0)) == 0.0 if warmup else float(sched(0)) == pytest.approx(c.optim.lr)
  assert float(sched(warmup)) == pytest.approx(c.optim.lr, rel=1e-5)  # the peak is the recipe's lr
  if c.optim.schedule == "cosine":
    assert float(sched(1000)) == pytest.approx(c.optim.lr * c.optim.min_lr_ratio, abs=1e-12)
  assert c.checkpoint.every > 0 and c.checkpoint.keep > 0


def test_recipes_carry_their_numbers():
  c = load(os.path.join(CONFIG_DIR, "orpo_gemma2_9b_it.py")).get_config(None)
  assert (c.objective, c.loss.orpo_lambda, c.optim.lr, c.optim.schedule, c.optim.warmup, c.data.max_length) == \
      ("orpo", 0.05, 3e-6, "cosine", 0.1, 8192)
  assert (c.batch_size, c.num_epochs, c.data.template, c.compute_dtype, c.remat) == \
      (128, 2.0, "gemma", "bfloat16", "block")

  cpu = load(os.path.join(CONFIG_DIR, "orpo_gemma3_270m_cpu.py")).get_config(None)
  assert cpu.init_from == "real:gemma3-270m" and cpu.objective == "orpo" and cpu.compute_dtype == "float32"

  ft = load(os.path.join(CONFIG_DIR, "finetune.py"))
  for model in ("gemma2-2b", "gemma3-1b"):
    family = TransformerConfig.from_preset(model).family
    for o in OBJECTIVES:
      c = ft.get_config(f"objective={o},model={model}")
      assert c.objective == o and c.data.template == FAMILY_TEMPLATES[family]
  assert ft.get_config("objective=simpo").loss.gamma == pytest.approx(0.55 * ft.get_config("objective=simpo").loss.beta)
  assert ft.get_config("objective=dpo").loss.beta == 0.1
  with pytest.raises(ValueError, match="objective"):
    ft.get_config("objective=kto")
  with pytest.raises(ValueError, match="bad argument"):
    ft.get_config("size=9b")
  with pytest.raises(ValueError, match="model='gemma9'; use one of gemma2-2b, gemma3-1b"):
    ft.get_config("model=gemma9")
  assert ft.get_config("objective=orpo").num_epochs == 3.0 and ft.get_config("objective=sft").data.packing


def test_script_reports_config_mistakes_in_one_line(tmp_path):
  args = [sys.executable, "-m", "train.train", "--config=configs/finetune.py:objective=dpo,model=gemma3-1b",
          f"--workdir={tmp_path}"]
  out = subprocess.run(args, env=subprocess_env(1), cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("error: init_from is empty")
  assert "Traceback" not in out.stderr
