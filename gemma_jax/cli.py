"""What the absl scripts share: the run-config flag and flag parsing that end a bad flag in one line.

    _CONFIG = cli.define_config_file("config", default_path, "Run config file ...")
    app.run(main, flags_parser=cli.parse_flags)

ml_collections parses `--config=FILE[:arg]` and `--config.a.b=value` overrides partly while the flag is
defined and partly while absl parses argv; either way a mistake (an unknown field, a value of the wrong type, a
recipe argument it refuses) would otherwise end in a long traceback with the useful line buried inside.
"""

from __future__ import annotations

import re
import sys

from absl import flags

from gemma_jax.errors import fail

USAGE_STATUS = 2  # a command-line mistake, as absl and argparse report it


def _last_line(text: str) -> str:
  """The line that says what went wrong: the last non-empty one, without an exception-class prefix."""
  lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
  line = lines[-1] if lines else str(text)
  return re.sub(r"^[A-Za-z_.]*(Error|Exception): ", "", line)


def _override_naming(key: str, argv: list[str], name: str) -> str | None:
  """The `--name.x.y=...` argument whose dotted path has the component `key`, if any."""
  for arg in argv:
    path = arg.split("=", 1)[0]
    if path.startswith(f"--{name}.") and key in path[len(name) + 3:].split("."):
      return path
  return None


def define_config_file(name: str, default: str, help_string: str, flag_values: flags.FlagValues = flags.FLAGS):
  """`config_flags.DEFINE_config_file`, with an unknown or mistyped `--name.field` ending in one line."""
  from ml_collections import config_flags
  try:
    return config_flags.DEFINE_config_file(name, default, help_string, flag_values=flag_values)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e.args[0]) if e.args else str(e)
    key_match = re.match(r"""^['"\\]*([A-Za-z_0-9]+)['"\\]*""", message)
    key = key_match.group(1) if key_match else ""
    hint = re.search(r'Did you mean "([^"]+)"', message)
    arg = _override_naming(key, sys.argv, name) if key else None
    if arg is not None:
      fail(f"{arg}: the run config has no field {key!r}"
           + (f"; did you mean {hint.group(1)!r}?" if hint else f" (see the fields in {default})"), USAGE_STATUS)
    fail(f"--{name}: {_last_line(message)}", USAGE_STATUS)


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's flag parsing for `app.run(..., flags_parser=...)`: a bad flag is one `error:` line, status 2."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    fail(_last_line(str(e)) if "Traceback" in str(e) else str(e).splitlines()[0], USAGE_STATUS)


def parse_variants(arg: str | None, choices: dict[str, tuple[str, ...]], where: str) -> dict[str, str]:
  """A recipe's `--config=FILE:key=value,...` argument -> {key: value}, each key's first choice its default.

  where: the recipe's path, named in the error. ValueError (ml_collections reports it in one line through
  `define_config_file`) for an unknown key or a value that is not one of the key's choices.
  """
  out = {key: options[0] for key, options in choices.items()}
  usage = ",".join(f"{key}=..." for key in choices)
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep or key not in choices:
      raise ValueError(f"{where}: bad argument {part!r}; use {usage}")
    if value not in choices[key]:
      raise ValueError(f"{where}: {key}={value!r}; use one of {', '.join(choices[key])}")
    out[key] = value
  return out
