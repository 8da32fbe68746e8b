"""Data pipelines: records -> validated examples -> template-rendered token ids -> padded/packed batches.

    from gemma_jax import data
    prepared = data.prepare_dataset(path, kind="preference", template=template, tokenizer=tokenizer,
                                    policy=data.LengthPolicy(max_length=1024))
    it = data.DataIterator(prepared, batch_size=8, seed=0)
    batch = next(it)   # tokens/input_mask/target_mask/nll_mask [2B, T]

Validate a file from the shell, as training would see it: `python -m gemma_jax.data.inspect FILE [--show=2]`.
"""

from gemma_jax.data.batching import (length_buckets, make_preference_batch, make_sft_batch, pad_rows,
                                     preference_rows, sequence_rows)
from gemma_jax.data.dataset import InvalidRecordsError, PreparedData, prepare_dataset
from gemma_jax.data.iterator import DataIterator
from gemma_jax.data.preference import PreferenceExample, TokenizedPair, parse_preference
from gemma_jax.data.records import Invalid, Record, read_records
from gemma_jax.data.sft import SFTExample, TokenizedSequence, parse_sft
from gemma_jax.data.truncation import LengthPolicy, PrepStats
