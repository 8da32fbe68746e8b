"""Converts any Gemma checkpoint we read into our format or into a transformers (HF) directory.

    python -m gemma_jax.convert --src=PATH --dst=PATH [--dst_format=native|hf|peft] [--dtype=float32|bfloat16]
        [--kind=pt|it] [--template=auto|none|<name>] [--overwrite] [--preset=NAME | --config_json=FILE]
        [--base=PATH] [--merge]

Adapters (LoRA): `--merge` folds an adapter checkpoint into a full model (native or hf); `--dst_format=peft`
writes the adapters as an HF peft directory; a peft directory is read with `--base=` its base (ours).

The source format is detected (`detect.py`): our checkpoint, a transformers Gemma directory, an official
Flax checkpoint or a GGUF file (`run.convert` does the work). Flags and the destination's directory are
checked before the source is read. The destination is written atomically: a failure or Ctrl-C leaves nothing
at `--dst`. User errors print one line `error: ...` and exit with status 1; Ctrl-C prints one line and exits
with status 130. Library logs (orbax, jax) go to ~/.cache/gemma_jax/logs/convert.log ($GEMMA_JAX_CACHE/logs);
`--verbosity=1` shows them on stderr too.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import NoReturn

from absl import app, flags

from gemma_jax.convert.run import _say, convert, identity, partial_outputs, undo_partial_write
from gemma_jax.errors import UserError, run_main
from gemma_jax.model.config import TransformerConfig

_SRC = flags.DEFINE_string("src", None, "Checkpoint to read: gemma_jax dir, HF dir, official Flax dir or .gguf.")
_DST = flags.DEFINE_string("dst", None, "Where to write; must not exist unless --overwrite.")
_DST_FORMAT = flags.DEFINE_string("dst_format", "native", "native (gemma_jax), hf (transformers safetensors) or "
                                  "peft (LoRA adapters alone).")
_DTYPE = flags.DEFINE_string("dtype", None, "Parameter dtype to write: float32, bfloat16 (default: the source's; "
                             "float32 for GGUF).")
_KIND = flags.DEFINE_string("kind", None, "pt (pretrained) or it (instruction-tuned); default: what the source "
                            "says.")
_TEMPLATE = flags.DEFINE_string("template", "auto", "Chat template saved with a native checkpoint: auto (the "
                                "source's, else the family's), none, or a template name.")
_PRESET = flags.DEFINE_string("preset", None, "Official Flax sources only: the model's preset (e.g. gemma2-2b) "
                              "when the shapes alone do not pin it down.")
_CONFIG_JSON = flags.DEFINE_string("config_json", None, "Official Flax sources only: a JSON file of the model "
                                   "config (TransformerConfig.to_dict()), for models that are no preset.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing checkpoint at --dst.")
_BASE = flags.DEFINE_string("base", None, "Adapter sources: the gemma_jax checkpoint of the base model (a peft "
                            "directory's, or an adapter checkpoint's whose base moved).")
_MERGE = flags.DEFINE_bool("merge", False, "Fold a source's adapters into the weights: a full model (needed for "
                           "--dst_format=hf).")


def _config_from_json(path: str) -> TransformerConfig:
  from gemma_jax.convert.common import read_json_object
  try:
    d = read_json_object(path)
  except UserError as e:  # its message starts with the path
    raise UserError(f"--config_json={e}") from None
  try:
    return TransformerConfig.from_dict(d)
  except (TypeError, ValueError) as e:  # missing fields, values of the wrong type
    raise UserError(f"--config_json={path}: not a model config of TransformerConfig fields ({e})") from None


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C

class _Interrupts:
  """The SIGINT handler during a conversion.

  The first Ctrl-C raises KeyboardInterrupt as usual, but first mutes stderr (fd 2, the C level included):
  orbax's and tensorstore's worker threads print tracebacks ("Event loop is closed") once the interrupted
  event loop is gone, and that is not the user's problem. Later Ctrl-Cs are ignored so the cleanup finishes.
  """

  def __init__(self):
    self.fired = False
    self.stderr: int | None = None  # the real stderr, for the one line said at the end

  def __call__(self, signum, frame):
    if self.fired:
      return
    self.fired = True
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stderr.flush()
    self.stderr = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    raise KeyboardInterrupt


def _exit_interrupted(line: str, stderr_fd: int | None) -> NoReturn:
  """Says `line` on the real stderr and leaves at once: exit handlers (jax's, orbax's threads) could print
  more tracebacks or hang on the interrupted work."""
  sys.stdout.flush()
  fd = stderr_fd if stderr_fd is not None else 2
  # A progress bar may have been cut mid-line: start a fresh one (on a terminal, clear it instead).
  start = "\r\x1b[K" if os.isatty(fd) else "\n"
  os.write(fd, f"{start}error: {line}\n".encode())
  os._exit(130)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from gemma_jax import console
  console.setup(console.log_path("convert"))  # orbax and jax log every step at INFO
  if not _SRC.value or not _DST.value:
    raise UserError("both --src=PATH and --dst=PATH are required, e.g. "
                    "python -m gemma_jax.convert --src=gemma-3-270m --dst=gemma-3-270m-jax")
  preset = _PRESET.value
  if _CONFIG_JSON.value:
    if preset:
      raise UserError("pass either --preset or --config_json, not both")
    preset = _config_from_json(_CONFIG_JSON.value)
  dst = _DST.value
  guard = _Interrupts() if threading.current_thread() is threading.main_thread() else None
  if guard is not None:
    signal.signal(signal.SIGINT, guard)
  before, dst_id = partial_outputs(dst), identity(os.path.abspath(dst))
  try:
    fmt = convert(src=_SRC.value, dst=dst, dst_format=_DST_FORMAT.value, dtype=_DTYPE.value,
                  kind=_KIND.value, template=_TEMPLATE.value, overwrite=_OVERWRITE.value, preset=preset,
                  base=_BASE.value, merge=_MERGE.value)
  except BaseException:
    if guard is None or not guard.fired:
      raise
  if guard is not None:
    if guard.fired:  # whatever the interrupt turned into on its way up (or if some code swallowed it)
      _exit_interrupted(undo_partial_write(dst, before, dst_id), guard.stderr)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # done: a late Ctrl-C must not break the exit into a traceback
  _say(f"wrote {dst} ({_DST_FORMAT.value}, from {fmt})")


def main(argv):
  run_main(_main, argv)


if __name__ == "__main__":
  app.run(main)
