"""`convert(src=..., dst=...)`: any Gemma checkpoint we read into our format or a transformers (HF) directory.

The library side of `python -m gemma_jax.convert` (no flags here, so it can be imported anywhere). Everything
that can be checked without the source (flag values, the destination and its directory) is checked before
the source is read; the destination is written atomically, and `undo_partial_write` cleans up after an
interrupted write (Ctrl-C).
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import time
from typing import Any

from gemma_jax.checkpoint_format import looks_native
from gemma_jax.convert.detect import is_peft_dir
from gemma_jax.errors import UserError
from gemma_jax.model.config import DTYPES, TransformerConfig

DST_FORMATS = ("native", "hf", "peft")

def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def _choice(name: str, value: str | None, choices: tuple[str, ...]) -> None:
  if value is not None and value not in choices:
    raise UserError(f"--{name}={value}: use one of {', '.join(choices)}")


def _read(fmt: str, src: str, dtype: str | None, preset=None, base: str | None = None):
  """Reads `src` into an `Imported`; native and peft sources also return their saved template dict (a peft
  directory: its base's) and, with adapters on a base checkpoint, `checkpoint.base_reference` of the base."""
  from gemma_jax.convert.common import Imported
  if fmt == "native":
    from gemma_jax import checkpoint
    ck = checkpoint.load(src, dtype=dtype, base=base)
    source = {k: v for k, v in ck.provenance.items() if k not in ("gemma_jax_version", "created")}
    imported = Imported(config=ck.config, params=ck.params, tokenizer=ck.tokenizer, kind=ck.kind,
                        source={"format": "native", "path": src, "provenance": source})
    ref = ck.metadata.get("base")
    return imported, ck.template, (dict(ref, path=os.path.abspath(base)) if ref and base else ref)
  if fmt == "peft":
    from gemma_jax import checkpoint
    from gemma_jax.convert.peft import read_peft
    from gemma_jax.model import lora
    ck = checkpoint.load(base, dtype=dtype)
    if ck.config.lora_rank:
      raise UserError(f"--base={base} carries adapters itself; pass the full base model")
    config, adapters = read_peft(src, ck.config, dtype=ck.config.param_dtype)
    imported = Imported(config=config, params=lora.attach(ck.params, adapters), tokenizer=ck.tokenizer,
                        kind=ck.kind, source={"format": "peft", "path": src, "base": os.path.abspath(base)})
    return imported, ck.template, checkpoint.base_reference(base)
  if fmt == "hf":
    from gemma_jax.convert.hf import read_hf
    return read_hf(src, dtype=dtype), None, None
  if fmt == "official":
    from gemma_jax.convert.official import read_official
    return read_official(src, dtype=dtype, preset=preset), None, None
  if fmt == "gguf":
    from gemma_jax.convert.gguf import read_gguf
    return read_gguf(src, dtype=dtype or "float32"), None, None
  raise AssertionError(fmt)


def _check_template(template: str) -> None:
  from gemma_jax.templates import TEMPLATE_NAMES
  if template not in ("auto", "none", *TEMPLATE_NAMES):
    raise UserError(f"--template={template}: not a chat template; use auto, none or one of "
                    f"{', '.join(TEMPLATE_NAMES)}")


def _template_dict(template: str, imported, saved: dict[str, Any] | None) -> dict[str, Any] | None:
  """The template to save: 'none', a name, or 'auto': the source's saved one, else the one whose HF Jinja text
  the source carries, else the family's."""
  if template == "none":
    return None
  from gemma_jax import templates
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


def _check_writable(dst: str) -> None:
  """Fails now, not after minutes of reading the source, when --dst's directory cannot be written."""
  existing = os.path.dirname(os.path.abspath(dst))
  while not os.path.lexists(existing):  # missing parents are made when writing
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UserError(f"--dst={dst}: {existing} is not a directory; choose another --dst")
  probe = os.path.join(existing, f".{os.path.basename(dst)}.write-test-{secrets.token_hex(4)}")
  try:  # os.access is no proof: root passes it on read-only directories, and it ignores some mounts
    os.mkdir(probe)
  except OSError as e:
    raise UserError(f"--dst={dst}: cannot write in {existing} ({e.strerror}); choose a writable location") from None
  os.rmdir(probe)


def _check_dst(dst: str, dst_format: str, overwrite: bool) -> None:
  _check_writable(dst)
  if not os.path.lexists(dst):
    return
  if not overwrite:
    raise UserError(f"{dst} exists; delete it, choose another --dst, or pass --overwrite")
  if dst_format == "native":
    ours = os.path.isdir(dst) and looks_native(dst)
  elif dst_format == "peft":
    ours = is_peft_dir(dst)
  else:
    ours = os.path.isdir(dst) and os.path.isfile(os.path.join(dst, "config.json"))
  if not ours:
    raise UserError(f"{dst} exists and is not a {'gemma_jax' if dst_format == 'native' else 'transformers'} "
                    "checkpoint; refusing to overwrite it")


def convert(*, src: str, dst: str, dst_format: str = "native", dtype: str | None = None,
            kind: str | None = None, template: str = "auto", overwrite: bool = False,
            preset: str | TransformerConfig | None = None, base: str | None = None, merge: bool = False) -> str:
  """Reads `src` (any format we read) and writes `dst` (native, hf or peft); returns the source format.

  preset: for official Flax sources, the preset name or config when the shapes do not pin the model down.
  Adapters (LoRA): base: the base checkpoint (ours) of a peft source, or of an adapter checkpoint whose base
  moved. merge: fold the adapters into the weights (a full model; an hf destination needs it). Without it a
  native destination stays an adapter checkpoint; peft writes the adapters alone.
  """
  from gemma_jax.convert.detect import detect_format
  _choice("dst_format", dst_format, DST_FORMATS)
  _choice("dtype", dtype, DTYPES)
  _choice("kind", kind, ("pt", "it"))
  _check_template(template)
  src, dst = os.path.normpath(src), os.path.normpath(dst)
  if os.path.abspath(src) == os.path.abspath(dst):
    raise UserError(f"--src and --dst are the same path ({src}); write to a new path")
  _check_dst(dst, dst_format, overwrite)
  fmt = detect_format(src)
  if preset is not None and fmt != "official":
    raise UserError(f"--preset/--config_json apply to official Flax sources only; {src} is {fmt}")
  if fmt == "peft" and not base:
    raise UserError(f"{src} is a peft adapter directory: pass --base=PATH, the gemma_jax checkpoint of its base "
                    "model (convert the HF base first)")
  if base and fmt not in ("peft", "native"):
    raise UserError(f"--base applies to adapter sources (peft directories, gemma_jax adapter checkpoints); {src} "
                    f"is {fmt}")
  _say(f"reading {src} ({fmt})")
  imported, saved_template, base_ref = _read(fmt, src, dtype, preset, base)
  kind = kind or imported.kind
  tmpl = _template_dict(template, imported, saved_template)
  adapters = bool(imported.config.lora_rank)
  if merge and not adapters:
    raise UserError(f"--merge: {src} carries no adapters to fold in")
  if dst_format == "hf" and adapters and not merge:
    raise UserError(f"{src} carries adapters and an HF directory holds a full model: pass --merge to fold them "
                    "into the weights, or --dst_format=peft for the adapters alone")
  if dst_format == "peft" and not adapters:
    raise UserError(f"{src} carries no adapters; --dst_format=peft writes adapters only")
  if merge:
    from gemma_jax.model.params import fold_adapters
    imported.config, imported.params = fold_adapters(imported.config, imported.params)
    base_ref = None
    _say("folded the adapters into the weights (a full model)")

  if dst_format == "native":
    from gemma_jax import checkpoint
    from gemma_jax.model import lora
    provenance = {"converted_from": {"format": fmt, "path": os.path.abspath(src),
                                     **{k: v for k, v in imported.source.items() if k not in ("format", "path")}}}
    if dtype is not None:
      provenance["converted_from"]["dtype"] = dtype
    params = lora.split(imported.params)[1] if base_ref else imported.params
    checkpoint.save(dst, config=imported.config, params=params, tokenizer=imported.tokenizer,
                    template=tmpl, kind=kind, provenance=provenance, overwrite=overwrite, base=base_ref)
  elif dst_format == "peft":
    from gemma_jax.convert.peft import write_peft
    from gemma_jax.model import lora
    write_peft(dst, imported.config, lora.split(imported.params)[1],
               base_name=(base_ref or {}).get("path", os.path.abspath(src)), dtype=dtype)
  else:
    from gemma_jax.convert.hf import write_hf
    write_hf(dst, imported.config, imported.params, tokenizer=imported.tokenizer,
             chat_template=_chat_template_text(tmpl, imported), dtype=dtype, overwrite=overwrite)
  if kind is None and dst_format == "native":
    _say("warning: the source does not say whether it is pretrained or instruction-tuned; pass --kind=pt|it "
         "so that samplers know (the checkpoint's kind is left unknown)")
  return fmt


# ---------------------------------------------------------------------------------------------------------
# After Ctrl-C

def identity(path: str) -> tuple[int, int] | None:
  """(device, inode) of `path` itself, None when absent: tells a newly renamed-in output from the original."""
  try:
    st = os.lstat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def partial_outputs(dst: str) -> set[str]:
  """What writing `dst` leaves beside it while in progress (`gemma_jax.atomic`): `<dst>.tmp-*`, `<dst>.old-*`."""
  parent, base = os.path.split(os.path.abspath(dst))
  try:
    names = os.listdir(parent)
  except OSError:
    return set()
  return {os.path.join(parent, n) for n in names if n.startswith((f"{base}.tmp-", f"{base}.old-"))}


def undo_partial_write(dst: str, before: set[str], dst_id: tuple[int, int] | None) -> str:
  """After Ctrl-C: puts back a checkpoint moved aside for --overwrite, removes what the interrupted write left
  (worker threads may still add files for a moment, so until nothing new appears for half a second), and
  returns the line to say."""
  abs_dst = os.path.abspath(dst)
  written = identity(abs_dst) not in (None, dst_id)  # the finished output was renamed into place
  if not written and dst_id is not None and identity(abs_dst) is None:
    for p in partial_outputs(dst) - before:  # interrupted between the two renames of an overwrite
      if identity(p) == dst_id:
        os.rename(p, abs_dst)
  deadline, quiet_since = time.monotonic() + 10, time.monotonic()
  while time.monotonic() - quiet_since < 0.5 and time.monotonic() < deadline:
    leftovers = partial_outputs(dst) - before
    for p in leftovers:
      if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
      else:
        try:
          os.remove(p)
        except OSError:
          pass
    if leftovers:
      quiet_since = time.monotonic()
    time.sleep(0.05)
  if written:
    return f"interrupted, but {dst} had already been written completely"
  return f"interrupted; nothing was written to {dst}"
