"""The run config is validated whole, before any work: every field that cannot work is named in one line."""

from __future__ import annotations

import pytest

from gemma_jax.errors import ConfigError
from gemma_jax.training.run_config import default_config, model_overrides, validate_run_config


def with_field(field, value):
  c = default_config()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  return c


def test_the_defaults_are_valid():
  validate_run_config(default_config())


@pytest.mark.parametrize("field,value,why", [
    ("eval.sample_tokens", 0, "integer >= 1"),
    ("eval.sample_tokens", 10**9, "<= 65536"),
    ("log_every", 0, "integer >= 1"),
    ("seed", -1, "integer >= 0"),
    ("seed", 2**64, "<= 2147483647"),
    ("optim.lr", float("nan"), "finite number"),
    ("optim.b2", 1.5, "<= 1"),
    ("optim.schedule", "cosin", "use one of cosine"),
    ("data.max_length", 1, "integer >= 2"),
    ("data.eval_fraction", 1.0, "must be < 1"),
    ("data.max_dropped_fraction", -0.1, ">= 0.0"),
    ("checkpoint.every", 0, "integer >= 1"),
    ("checkpoint.resume_step", -2, "integer >= -1"),
    ("compute_dtype", "float64", "use one of"),
    ("loss.label_smoothing", 0.7, "<= 0.5"),
    ("max_skipped_fraction", 2.0, "<= 1.0"),
    ("num_steps", 0, None),  # fine on its own...
])
def test_a_bad_field_is_named(field, value, why):
  c = with_field(field, value)
  if why is None:
    validate_run_config(c)
    return
  with pytest.raises(ConfigError, match=rf"config field {field}=.*{why}"):
    validate_run_config(c)


def test_packing_needs_sft_and_num_steps():
  c = with_field("data.packing", True)
  with pytest.raises(ConfigError, match="data.packing.*sft objective only"):
    validate_run_config(c)
  c.objective = "sft"
  with pytest.raises(ConfigError, match="num_steps.*must be set"):
    validate_run_config(c)
  c.num_steps = 5
  validate_run_config(c)


def test_model_overrides_refuse_run_level_fields():
  c = default_config()
  c.model_overrides.num_layers = 2
  assert model_overrides(c) == {"num_layers": 2}
  assert "dtype" not in c.model_overrides  # compute_dtype says that
  c = with_field("model_overrides", {"dtype": "bfloat16"})
  with pytest.raises(ConfigError, match=r"model_overrides.dtype.*--config.compute_dtype"):
    validate_run_config(c)
