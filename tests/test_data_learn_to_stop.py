"""Base-to-chat on a tiny model: with `<end_of_turn>` among the targets a fresh (base) model learns to stop.

A randomly initialized tiny Gemma 3 (a "base" model that has never seen the template) is trained on SFT
batches from the data pipeline, then decoded greedily from `render_prompt` until a stop id of the template.
With the pipeline's targets (reply + `<end_of_turn>`) it answers and stops right after the reply; with the
`<end_of_turn>` target removed (the classic masking bug) it answers but does not stop there. The same check on
the real 270M comes with the end-to-end demo.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from helpers import tiny_config
from gemma_jax.data import TokenizedSequence, make_sft_batch
from gemma_jax.model import Transformer, init_params
from gemma_jax.templates import get_template

QA = [("the capital of france is", "paris ."), ("one two three", "four five six"),
      ("how are you today ?", "fine thanks !"), ("hello", "hello world")]


def train_and_generate(tok, *, eos_target=False, drop_eot_target=False, steps=100):
  template = get_template("gemma3")
  eot = tok.special.end_of_turn
  seqs = []
  for q, ans in QA:
    ids, mask = template.render_training([{"role": "user", "content": q}, {"role": "assistant", "content": ans}],
                                         tok, eos_target=eos_target)
    mask = [m and not (drop_eot_target and i == eot) for i, m in zip(ids, mask)]
    seqs.append(TokenizedSequence("qa", np.asarray(ids, np.int32), np.asarray(mask, bool)))
  batch = {k: jnp.asarray(v) for k, v in make_sft_batch(seqs, 64).items()}

  config = tiny_config("gemma3", vocab_size=tok.vocab_size, num_layers=2)
  model = Transformer(config)
  params = init_params(config, jax.random.key(0))

  def loss_fn(p):
    logits, _ = model.apply({"params": p}, batch["tokens"], input_mask=batch["input_mask"])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["tokens"][:, 1:, None], axis=-1)[..., 0]
    m = batch["target_mask"][:, 1:]  # token t is predicted from the logits at t - 1
    return jnp.sum(nll * m) / jnp.sum(m)

  opt = optax.adam(1e-2)
  state = opt.init(params)

  @jax.jit
  def step(p, s):
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, s = opt.update(g, s, p)
    return optax.apply_updates(p, updates), s, loss

  for _ in range(steps):
    params, state, loss = step(params, state)

  @jax.jit
  def next_token(p, ids, n):  # ids: [64], the first n real; one shape, one compile
    mask = jnp.arange(ids.shape[0]) < n
    logits, _ = model.apply({"params": p}, ids[None], input_mask=mask[None])
    return jnp.argmax(logits[0, n - 1])

  stop = set(template.stop_token_ids(tok))
  outputs = []
  for q, _ in QA:
    ids = template.render_prompt([{"role": "user", "content": q}], tok)
    out = []
    for _ in range(24):
      seq = ids + out
      t = int(next_token(params, jnp.asarray(seq + [0] * (64 - len(seq)), jnp.int32), len(seq)))
      out.append(t)
      if t in stop:
        break
    outputs.append(out)
  return float(loss), outputs


def test_base_model_learns_to_stop(tiny_tokenizer):
  tok = tiny_tokenizer
  loss, outputs = train_and_generate(tok)
  assert loss < 0.05
  for (_, ans), out in zip(QA, outputs):
    assert out == tok.encode(ans) + [tok.special.end_of_turn]  # the reply, then it stops


def test_without_end_of_turn_target_it_does_not_stop(tiny_tokenizer):
  tok = tiny_tokenizer
  _, outputs = train_and_generate(tok, drop_eot_target=True)
  for (_, ans), out in zip(QA, outputs):
    n = len(tok.encode(ans))
    assert out[:n] == tok.encode(ans) and out[n:n + 1] != [tok.special.end_of_turn]
