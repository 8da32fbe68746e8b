"""Converts any Gemma checkpoint we read into our format or into a transformers (HF) directory.

    python -m gemma_jax.convert --src=PATH --dst=PATH [--dst_format=native|hf] [--dtype=float32|bfloat16]
        [--kind=pt|it] [--template=auto|none|<name>] [--overwrite] [--preset=NAME | --config_json=FILE]

The source format is detected (`detect.py`): our checkpoint, a transformers Gemma directory, an official
Flax checkpoint or a GGUF file. The destination is written atomically: a failure or Ctrl-C leaves nothing
at `--dst`. User errors print one line `error: ...` and exit with status 1.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
from typing import Any

from absl import app, flags, logging

from gemma_jax.errors import UserError, run_main
from gemma_jax.model.config import TransformerConfig

DST_FORMATS = ("native", "hf")
DTYPES = ("float32", "bfloat16", "float16")

_SRC = flags.DEFINE_string("src", None, "Checkpoint to read: gemma_jax dir, HF dir, official Flax dir or .gguf.")
_DST = flags.DEFINE_string("dst", None, "Where to write; must not exist unless --overwrite.")
_DST_FORMAT = flags.DEFINE_string("dst_format", "native", "native (gemma_jax) or hf (transformers safetensors).")
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


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
  if value is not None and value not in choices:
    raise UserError(f"--{name}={value}: use one of {', '.join(choices)}")


def _read(fmt: str, src: str, dtype: str | None, preset=None):
  """Reads `src` into an `Imported`; native sources also return their saved template dict."""
  from gemma_jax.convert.common import Imported
  if fmt == "native":
    from gemma_jax import checkpoint
    ck = checkpoint.load(src, dtype=dtype)
    source = {k: v for k, v in ck.provenance.items() if k not in ("gemma_jax_version", "created")}
    imported = Imported(config=ck.config, params=ck.params, tokenizer=ck.tokenizer, kind=ck.kind,
                        source={"format": "native", "path": src, "provenance": source})
    return imported, ck.template
  if fmt == "hf":
    from gemma_jax.convert.hf import read_hf
    return read_hf(src, dtype=dtype), None
  if fmt == "official":
    from gemma_jax.convert.official import read_official
    return read_official(src, dtype=dtype, preset=preset), None
  if fmt == "gguf":
    from gemma_jax.convert.gguf import read_gguf
    return read_gguf(src, dtype=dtype or "float32"), None
  raise AssertionError(fmt)


def _template_dict(template: str, imported, saved: dict[str, Any] | None) -> dict[str, Any] | None:
  """The template to save: 'none', a name, or 'auto': the source's saved one, else the one whose HF Jinja text
  the source carries, else the family's."""
  if template == "none":
    return None
  try:
    from gemma_jax import templates
  except ImportError:
    if template != "auto":
      raise UserError(f"--template={template}: chat templates are not available in this gemma_jax") from None
    return saved
  if template != "auto":
    return templates.get_template(template).to_dict()
  if saved is not None:
    return saved
  for name, jinja in templates.HF_CHAT_TEMPLATES.items():
    if imported.chat_template is not None and imported.chat_template.strip() == jinja.strip():
      return templates.get_template(name).to_dict()
  return templates.template_for_family(imported.config.family).to_dict()


def _chat_template_text(template: dict[str, Any] | None, imported) -> str | None:
  """The Jinja chat template written with an HF export: the source's own text, else our template's."""
  if imported.chat_template is not None:
    return imported.chat_template
  if template is None:
    return None
  from gemma_jax.templates import ChatTemplate
  return ChatTemplate.from_dict(template).hf_jinja


def _check_dst(dst: str, dst_format: str, overwrite: bool) -> None:
  if not os.path.lexists(dst):
    return
  if not overwrite:
    raise UserError(f"{dst} exists; delete it, choose another --dst, or pass --overwrite")
  if dst_format == "native":
    from gemma_jax.checkpoint import _looks_native
    ours = os.path.isdir(dst) and _looks_native(dst)
  else:
    ours = os.path.isdir(dst) and os.path.isfile(os.path.join(dst, "config.json"))
  if not ours:
    raise UserError(f"{dst} exists and is not a {'gemma_jax' if dst_format == 'native' else 'transformers'} "
                    "checkpoint; refusing to overwrite it")


def _write_hf_atomically(dst: str, imported, chat_template, dtype: str | None) -> None:
  from gemma_jax.checkpoint import _move_into_place
  from gemma_jax.convert.hf import write_hf
  tmp = f"{dst}.tmp-{secrets.token_hex(4)}"
  try:
    write_hf(tmp, imported.config, imported.params, tokenizer=imported.tokenizer, chat_template=chat_template,
             dtype=dtype)
    _move_into_place(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def convert(*, src: str, dst: str, dst_format: str = "native", dtype: str | None = None,
            kind: str | None = None, template: str = "auto", overwrite: bool = False,
            preset: str | TransformerConfig | None = None) -> str:
  """Reads `src` (any format we read) and writes `dst` (native or hf); returns the source format.

  preset: for official Flax sources, the preset name or config when the shapes do not pin the model down.
  """
  from gemma_jax.convert.detect import detect_format
  _choice("dst_format", dst_format, DST_FORMATS)
  _choice("dtype", dtype, DTYPES)
  _choice("kind", kind, ("pt", "it"))
  src, dst = os.path.normpath(src), os.path.normpath(dst)
  if os.path.abspath(src) == os.path.abspath(dst):
    raise UserError(f"--src and --dst are the same path ({src}); write to a new path")
  _check_dst(dst, dst_format, overwrite)
  fmt = detect_format(src)
  if preset is not None and fmt != "official":
    raise UserError(f"--preset/--config_json apply to official Flax sources only; {src} is {fmt}")
  _say(f"reading {src} ({fmt})")
  imported, saved_template = _read(fmt, src, dtype, preset)
  kind = kind or imported.kind
  tmpl = _template_dict(template, imported, saved_template)

  if dst_format == "native":
    from gemma_jax import checkpoint
    provenance = {"converted_from": {"format": fmt, "path": os.path.abspath(src),
                                     **{k: v for k, v in imported.source.items() if k not in ("format", "path")}}}
    if dtype is not None:
      provenance["converted_from"]["dtype"] = dtype
    checkpoint.save(dst, config=imported.config, params=imported.params, tokenizer=imported.tokenizer,
                    template=tmpl, kind=kind, provenance=provenance, overwrite=overwrite)
  else:
    _write_hf_atomically(dst, imported, _chat_template_text(tmpl, imported), dtype)
  if kind is None and dst_format == "native":
    _say("warning: the source does not say whether it is pretrained or instruction-tuned; pass --kind=pt|it "
         "so that samplers know (the checkpoint's kind is left unknown)")
  return fmt


def _config_from_json(path: str) -> TransformerConfig:
  try:
    with open(path) as f:
      d = json.load(f)
  except OSError as e:
    raise UserError(f"--config_json={path}: cannot read ({e.strerror})") from None
  except ValueError as e:
    raise UserError(f"--config_json={path}: not valid JSON ({e})") from None
  if not isinstance(d, dict):
    raise UserError(f"--config_json={path}: expected a JSON object of TransformerConfig fields")
  return TransformerConfig.from_dict(d)


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every step at INFO
  if not _SRC.value or not _DST.value:
    raise UserError("both --src=PATH and --dst=PATH are required, e.g. "
                    "python -m gemma_jax.convert --src=gemma-3-270m --dst=gemma-3-270m-jax")
  preset = _PRESET.value
  if _CONFIG_JSON.value:
    if preset:
      raise UserError("pass either --preset or --config_json, not both")
    preset = _config_from_json(_CONFIG_JSON.value)
  try:
    fmt = convert(src=_SRC.value, dst=_DST.value, dst_format=_DST_FORMAT.value, dtype=_DTYPE.value,
                  kind=_KIND.value, template=_TEMPLATE.value, overwrite=_OVERWRITE.value, preset=preset)
  except KeyboardInterrupt:
    print(f"error: interrupted; nothing was written to {_DST.value}", file=sys.stderr, flush=True)
    raise SystemExit(130)
  _say(f"wrote {_DST.value} ({_DST_FORMAT.value}, from {fmt})")


def main(argv):
  run_main(_main, argv)


if __name__ == "__main__":
  app.run(main)
