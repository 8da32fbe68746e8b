"""The HF <-> official Flax parameter name map, and moving whole parameter trees across it one tensor at a time.

    name_map(config)           [(our path, HF names without "model.", transform)], in export order
    hf_shapes(config, rows)    HF name -> shape
    params_from_hf(config, names, get_tensor, ...) -> our tree      params_to_hf(config, params) -> (name, array)...

With N heads, K kv heads, H head dim, D model, F MLP (the full table, the transforms and the embedding rows:
docs/WEIGHTS.md):

    embedder/input_embedding [V, D]         model.embed_tokens.weight [V, D]   (head tied)
    attn/q_einsum/w [N, D, H]               self_attn.q_proj.weight [N*H, D]
    attn/kv_einsum/w [2, K, D, H]           self_attn.{k,v}_proj.weight [K*H, D]
    attn/qkv_einsum/w [3, N, D, H] (K = N)  self_attn.{q,k,v}_proj.weight [N*H, D]
    attn/attn_vec_einsum/w [N, H, D]        self_attn.o_proj.weight [D, N*H]
    attn/k_einsum/w [K, D, H] (Gemma 4)     self_attn.k_proj.weight [K*H, D]  (global layers with K = V)
    attn/_query_norm, _key_norm [H]         self_attn.q_norm, k_norm
    mlp/gating_einsum [2, F, D]             mlp.gate_proj, up_proj [F, D]
    mlp/linear [F, D]                       mlp.down_proj [D, F]
    pre_attention_norm                      input_layernorm
    post_attention_norm (G2/G3)             post_attention_layernorm
    pre_ffw_norm                            pre_feedforward_layernorm; in Gemma 1: post_attention_layernorm (!)
    post_ffw_norm                           post_feedforward_layernorm
    layer_scalar [1] (Gemma 4)              layer_scalar
    final_norm                              model.norm

K and H are each layer's own: Gemma 4's global layers have theirs.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from gemma_jax.errors import CheckpointError
from gemma_jax.model.config import TransformerConfig
from gemma_jax.model.params import expected_shapes
from gemma_jax.progress import progress_bar


def _layer_map(config: TransformerConfig, i: int) -> list[tuple[tuple[str, ...], list[str], str]]:
  """(our path, HF names, transform) for layer i. Transforms are named; see `_to_ours` / `_to_hf`."""
  c = config
  p = f"layers.{i}."
  L = f"layer_{i}"
  a = p + "self_attn."
  rows = []
  t = c.attention_types[i]
  if c.kv_source(i) is not None:  # KV-shared: queries only (HF builds no k/v projections or key norm here)
    rows.append(((L, "attn", "q_einsum", "w"), [a + "q_proj.weight"], "heads1"))
  elif c.k_eq_v(t):  # Gemma 4 global layers: k_proj gives keys and values, there is no v_proj
    rows.append(((L, "attn", "q_einsum", "w"), [a + "q_proj.weight"], "heads1"))
    rows.append(((L, "attn", "k_einsum", "w"), [a + "k_proj.weight"], "heads1"))
  elif c.kv_heads_of(t) == c.num_heads:
    rows.append(((L, "attn", "qkv_einsum", "w"), [a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight"],
                 "heads"))
  else:
    rows.append(((L, "attn", "q_einsum", "w"), [a + "q_proj.weight"], "heads1"))
    rows.append(((L, "attn", "kv_einsum", "w"), [a + "k_proj.weight", a + "v_proj.weight"], "heads"))
  rows.append(((L, "attn", "attn_vec_einsum", "w"), [a + "o_proj.weight"], "out"))
  if c.use_qk_norm:
    rows.append(((L, "attn", "_query_norm", "scale"), [a + "q_norm.weight"], "none"))
    if c.kv_source(i) is None:
      rows.append(((L, "attn", "_key_norm", "scale"), [a + "k_norm.weight"], "none"))
  rows.append(((L, "mlp", "gating_einsum"), [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"], "stack"))
  rows.append(((L, "mlp", "linear"), [p + "mlp.down_proj.weight"], "T"))
  rows.append(((L, "pre_attention_norm", "scale"), [p + "input_layernorm.weight"], "none"))
  if c.family == "gemma1":  # HF Gemma 1 calls the pre-MLP norm post_attention_layernorm
    rows.append(((L, "pre_ffw_norm", "scale"), [p + "post_attention_layernorm.weight"], "none"))
  else:
    if c.use_post_attn_norm:
      rows.append(((L, "post_attention_norm", "scale"), [p + "post_attention_layernorm.weight"], "none"))
    rows.append(((L, "pre_ffw_norm", "scale"), [p + "pre_feedforward_layernorm.weight"], "none"))
  if c.use_post_ffw_norm:
    rows.append(((L, "post_ffw_norm", "scale"), [p + "post_feedforward_layernorm.weight"], "none"))
  if c.num_experts:
    rows.append(((L, "moe", "router_w"), [p + "router.proj.weight"], "T"))
    rows.append(((L, "moe", "router_scale"), [p + "router.scale"], "none"))
    rows.append(((L, "moe", "per_expert_scale"), [p + "router.per_expert_scale"], "none"))
    rows.append(((L, "moe", "expert_gating"), [p + "experts.gate_up_proj"], "experts_gate_up"))
    rows.append(((L, "moe", "expert_linear"), [p + "experts.down_proj"], "experts_down"))
    rows.append(((L, "post_ffw_norm_1", "scale"), [p + "post_feedforward_layernorm_1.weight"], "none"))
    rows.append(((L, "pre_ffw_norm_2", "scale"), [p + "pre_feedforward_layernorm_2.weight"], "none"))
    rows.append(((L, "post_ffw_norm_2", "scale"), [p + "post_feedforward_layernorm_2.weight"], "none"))
  if c.per_layer_input_dim:
    rows.append(((L, "per_layer", "per_layer_input_gate", "w"), [p + "per_layer_input_gate.weight"], "T"))
    rows.append(((L, "per_layer", "per_layer_projection", "w"), [p + "per_layer_projection.weight"], "T"))
    rows.append(((L, "per_layer", "norm", "scale"), [p + "post_per_layer_input_norm.weight"], "none"))
  if c.use_layer_scalar:
    rows.append(((L, "layer_scalar"), [p + "layer_scalar"], "none"))
  return rows


def name_map(config: TransformerConfig) -> list[tuple[tuple[str, ...], list[str], str]]:
  """Every parameter: (our path, HF names without the `model.` prefix, transform)."""
  rows = [(("embedder", "input_embedding"), ["embed_tokens.weight"], "none")]
  if config.per_layer_input_dim:
    rows += [(("per_layer_inputs", "embedding"), ["embed_tokens_per_layer.weight"], "none"),
             (("per_layer_inputs", "per_layer_model_projection", "w"), ["per_layer_model_projection.weight"], "T"),
             (("per_layer_inputs", "norm", "scale"), ["per_layer_projection_norm.weight"], "none")]
  for i in range(config.num_layers):
    rows += _layer_map(config, i)
  rows.append((("final_norm", "scale"), ["norm.weight"], "none"))
  return rows


def hf_shapes(config: TransformerConfig, vocab_rows: int | None = None) -> dict[str, tuple[int, ...]]:
  """HF tensor name (without prefix) -> shape: ours as it is ("none"; the embedding with HF's rows),
  transposed ("T"), or split back into HF's per-projection matrices."""
  c = config
  D, N = c.embed_dim, c.num_heads
  V = c.vocab_size if vocab_rows is None else vocab_rows
  ours = expected_shapes(config)
  out = {}
  for path, names, kind in name_map(config):
    shape = ours["/".join(path)]
    K, H = _layer_dims(c, path)
    for n in names:
      if n == "embed_tokens.weight":
        out[n] = (V, D)
      elif kind == "none":
        out[n] = shape
      elif kind == "T":
        out[n] = tuple(reversed(shape))
      elif kind == "stack":  # gate, up: [2, F, D] -> [F, D] each
        out[n] = shape[1:]
      elif kind == "experts_gate_up":  # [E, 2, I, D] -> [E, 2I, D]
        out[n] = (shape[0], 2 * shape[2], shape[3])
      elif kind == "experts_down":  # [E, I, D] -> [E, D, I]
        out[n] = (shape[0], shape[2], shape[1])
      elif n.endswith("q_proj.weight"):
        out[n] = (N * H, D)
      elif n.endswith(("k_proj.weight", "v_proj.weight")):
        out[n] = (K * H, D)
      else:  # o_proj
        out[n] = (D, N * H)
  return out


def _layer_dims(config: TransformerConfig, path: tuple[str, ...]) -> tuple[int, int]:
  """(K, H) of the layer a parameter path belongs to (Gemma 4's global layers have their own)."""
  if not path[0].startswith("layer_"):
    return config.num_kv_heads, config.head_dim
  t = config.attention_types[int(path[0].split("_")[1])]
  return config.kv_heads_of(t), config.head_dim_of(t)


def _to_ours(config: TransformerConfig, kind: str, ts: list[np.ndarray], H: int) -> np.ndarray:
  c = config
  D = c.embed_dim
  if kind == "none":
    return ts[0]
  if kind == "heads1":  # [N*H, D] -> [N, D, H]
    return ts[0].reshape(-1, H, D).transpose(0, 2, 1)
  if kind == "heads":  # k, v (or q, k, v): [X*H, D] each -> [2|3, X, D, H]
    return np.stack([t.reshape(-1, H, D).transpose(0, 2, 1) for t in ts])
  if kind == "out":  # [D, N*H] -> [N, H, D]
    return ts[0].reshape(D, -1, H).transpose(1, 2, 0)
  if kind == "stack":  # gate, up [F, D] -> [2, F, D]
    return np.stack(ts)
  if kind == "T":  # [D, F] -> [F, D]
    return ts[0].T
  if kind == "experts_gate_up":  # [E, 2I, D] -> [E, 2, I, D]
    e, two_i, d = ts[0].shape
    return ts[0].reshape(e, 2, two_i // 2, d)
  if kind == "experts_down":  # [E, D, I] -> [E, I, D]
    return ts[0].transpose(0, 2, 1)
  raise AssertionError(kind)


def _to_hf(config: TransformerConfig, kind: str, w: np.ndarray) -> list[np.ndarray]:
  c = config
  D = c.embed_dim
  if kind == "none":
    return [w]
  if kind == "heads1":  # [N, D, H] -> [N*H, D]
    return [w.transpose(0, 2, 1).reshape(-1, D)]
  if kind == "heads":
    return [x.transpose(0, 2, 1).reshape(-1, D) for x in w]
  if kind == "out":  # [N, H, D] -> [D, N*H]
    return [w.transpose(2, 0, 1).reshape(D, -1)]
  if kind == "stack":
    return [w[0], w[1]]
  if kind == "T":
    return [w.T]
  if kind == "experts_gate_up":
    return [w.reshape(w.shape[0], -1, w.shape[-1])]
  if kind == "experts_down":
    return [w.transpose(0, 2, 1)]
  raise AssertionError(kind)


def _ignored_kv_of_shared_layers(config: TransformerConfig) -> set[str]:
  """k/v projections and norms hub files may hold for KV-shared layers (HF ignores them on load; so do we)."""
  return {f"layers.{i}.self_attn.{n}.weight" for i in range(config.num_layers) if config.kv_source(i) is not None
          for n in ("k_proj", "v_proj", "k_norm", "v_norm")}


# Prefixes of the language model's tensors, and of tensors that belong to other towers (ignored).
LM_PREFIXES = ("model.language_model.", "language_model.model.", "model.")
HEAD_NAMES = ("lm_head.weight", "language_model.lm_head.weight")
IGNORED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.",
                    "model.multi_modal_projector.", "vision_model.")


def lm_prefix(names: Iterable[str]) -> str:
  names = list(names)
  for p in LM_PREFIXES:
    if any(n.startswith(p + "embed_tokens.") for n in names):
      return p
  for p in LM_PREFIXES:
    if any(n.startswith(p + "layers.") or n.startswith(p + "norm.") for n in names):
      return p
  return "model."


def _pad_rows(w: np.ndarray, rows: int) -> np.ndarray:
  if w.shape[0] == rows:
    return w
  if w.shape[0] > rows:
    return w[:rows]
  return np.concatenate([w, np.zeros((rows - w.shape[0],) + w.shape[1:], w.dtype)])


def params_from_hf(config: TransformerConfig, names: Mapping[str, tuple[int, ...]] | Iterable[str],
                   get_tensor: Callable[[str], np.ndarray], dtype: Any = None, *,
                   where: Callable[[str], str] = lambda name: "the checkpoint", vocab_rows: int | None = None,
                   progress: bool = False) -> dict[str, Any]:
  """Our parameter tree from HF tensors, one tensor at a time.

  names: the checkpoint's tensor names, or a mapping name -> shape (then shapes are checked before reading);
  get_tensor(name) -> np.ndarray; dtype: target dtype (None keeps the stored one); where(name): the file
  holding a tensor, for error messages; vocab_rows: pad (zeros) or trim the embedding to this many rows.
  Every expected tensor must be present with its shape, and nothing unexpected may be left over
  (vision-tower tensors of multimodal checkpoints are skipped); otherwise CheckpointError.
  """
  shapes = dict(names) if isinstance(names, Mapping) else {n: None for n in names}
  prefix = lm_prefix(shapes)
  expected = {prefix + n: s for n, s in hf_shapes(config).items()}
  missing = [n for n in expected if n not in shapes]
  if missing:
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise CheckpointError(f"{where(missing[0])}: tensor {missing[0]} is missing{more}; the weights do not match "
                          "config.json (incomplete download or a different model?)")
  ignored = {prefix + n for n in _ignored_kv_of_shared_layers(config)}
  extra = [n for n in shapes if n not in expected and n not in HEAD_NAMES and n not in ignored
           and not n.startswith(IGNORED_PREFIXES) and not n.endswith("rotary_emb.inv_freq")]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise CheckpointError(f"{where(extra[0])}: unexpected tensor {extra[0]}{more} for a {config.family} model "
                          f"with {config.num_layers} layers; the checkpoint does not match its config.json")

  def check(name, shape):
    if tuple(shape) != tuple(expected[name]):
      raise CheckpointError(f"{where(name)}: tensor {name} has shape {list(shape)}, config.json implies "
                            f"{list(expected[name])}; the checkpoint does not match its config")

  for n, s in shapes.items():
    if n in expected and s is not None:
      check(n, s)

  def load(name):
    t = np.asarray(get_tensor(name))
    check(name, t.shape)
    return t if dtype is None else t.astype(dtype, copy=False)

  params: dict[str, Any] = {}
  rows = name_map(config)
  for path, hf_names, kind in progress_bar(rows, desc="reading tensors", unit="tensor", disable=not progress):
    w = _to_ours(config, kind, [load(prefix + n) for n in hf_names], _layer_dims(config, path)[1])
    if path == ("embedder", "input_embedding") and vocab_rows is not None:
      w = _pad_rows(w, vocab_rows)
    node = params
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = w
  for head in HEAD_NAMES:
    if head in shapes:  # a saved copy of the tied head must really be the embedding
      if not np.array_equal(np.asarray(get_tensor(head)), np.asarray(get_tensor(prefix + "embed_tokens.weight"))):
        raise CheckpointError(f"{where(head)}: {head} differs from the embedding; untied output heads are not "
                              "supported (Gemma ties them)")
  return params


def params_to_hf(config: TransformerConfig, params: Mapping[str, Any], *, prefix: str = "model.",
                 vocab_rows: int | None = None, dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, array) one tensor at a time, in `name_map` order. vocab_rows: rows of the exported
  embedding (trim or zero-pad); dtype: cast (None keeps the params' dtype)."""
  expected = expected_shapes(config)
  for path, hf_names, kind in name_map(config):
    node = params
    try:
      for k in path:
        node = node[k]
    except (KeyError, TypeError):
      raise CheckpointError(f"parameter {'/'.join(path)} is missing from the model") from None
    w = np.asarray(node)
    if path == ("embedder", "input_embedding") and vocab_rows is not None:
      w = _pad_rows(w, vocab_rows)
    if path != ("embedder", "input_embedding") or vocab_rows is None:
      want = expected['/'.join(path)]
      if w.shape != want:
        raise CheckpointError(f"parameter {'/'.join(path)} has shape {list(w.shape)}, the config implies "
                              f"{list(want)}")
    for n, t in zip(hf_names, _to_hf(config, kind, w)):
      if dtype is not None:
        t = t.astype(dtype, copy=False)
      yield prefix + n, np.ascontiguousarray(t)


def names_in_order(config: TransformerConfig) -> list[tuple[str, tuple[int, ...]]]:
  shapes = hf_shapes(config)
  return [("model." + n, shapes[n]) for _, names, _ in name_map(config) for n in names]
