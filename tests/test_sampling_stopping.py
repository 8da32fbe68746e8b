"""gemma_jax.sampling.stopping: which ids end a reply, user stop tokens, cutting at a stop."""

from __future__ import annotations

import numpy as np
import pytest

from gemma_jax.errors import UserError
from gemma_jax.sampling.stopping import (MAX_STOP_IDS, StopRules, cut_at_stop_id, default_stop_ids,
                                         find_stop_string, parse_stop_tokens, stop_ids_for)
from gemma_jax.templates import get_template


def test_stop_ids_for_templates_and_plain_completion(tiny_tokenizer):
  tok = tiny_tokenizer
  eos, eot = tok.special.eos, tok.special.end_of_turn
  assert default_stop_ids(tok) == (eos, eot)
  assert stop_ids_for(None, tok) == (eos, eot)
  assert stop_ids_for(get_template("gemma3"), tok) == tuple(get_template("gemma3").stop_token_ids(tok))
  # user ids come after, each id once (a user id equal to eos is not repeated)
  assert stop_ids_for(get_template("gemma"), tok, [7, eos, 7, 9]) == (eos, eot, 7, 9)


def test_parse_stop_tokens(tiny_tokenizer):
  tok = tiny_tokenizer
  assert parse_stop_tokens(["<end_of_turn>", " 5 ", tok.id_to_piece(40)], tok) == (tok.special.end_of_turn, 5, 40)
  with pytest.raises(UserError, match="outside the vocabulary"):
    parse_stop_tokens([str(tok.vocab_size)], tok)
  with pytest.raises(UserError, match="not a single piece"):
    parse_stop_tokens(["<no_such_piece>"], tok)


def test_stop_rules_and_cutting():
  ids = StopRules((1, 106)).id_array()
  assert ids.dtype == np.int32 and ids.shape == (MAX_STOP_IDS,) and list(ids[:3]) == [1, 106, -1]
  with pytest.raises(UserError, match="at most"):
    StopRules(tuple(range(MAX_STOP_IDS + 1)))
  with pytest.raises(UserError, match="empty"):
    StopRules((1,), ("",))
  assert cut_at_stop_id([5, 6, 106, 7, 1], (1, 106)) == ([5, 6], 106)
  assert cut_at_stop_id([5, 6], (1,)) == ([5, 6], None)
  assert find_stop_string("a long answer\nUser: x", ["User:", "\n"]) == len("a long answer")
  assert find_stop_string("nothing", ["User:"]) == -1
