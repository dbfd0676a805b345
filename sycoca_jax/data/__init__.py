"""Data: the built-in scenes, real datasets, tokenizers and the grain input pipelines.

  build_train_iterator(data_config, *, global_batch_size, seed, process_index=None, process_count=None)
      -> iterator of this process's batches {'image': u8 [b, S, S, 3], 'text': i32 [b, L],
         'example_id': i32 [b]}, with get_state() / set_state(), skip counters in .stats and close() (stops
         the input worker processes, data_config.num_workers)
  prefetch.DevicePrefetcher(train_iterator, put, size) -> the same batches on the devices, `size` ahead, with
      get_state() / set_state() of the last batch handed out (what the trainer checkpoints)
  load_eval_split(data_config, split, max_examples=0) -> EvalSplit (captions, labels, scene graphs, masked
      image batches; the first max_examples only if set)
  get_tokenizer(name, **kw) -> Tokenizer ('clip_bpe', 'scenes_words', 'sentencepiece')
  default_data_config() -> ml_collections.ConfigDict of the keys above, with the scenes defaults
"""

from sycoca_jax.data.pipeline import EvalSplit
from sycoca_jax.data.pipeline import TrainIterator
from sycoca_jax.data.pipeline import build_train_iterator
from sycoca_jax.data.pipeline import default_data_config
from sycoca_jax.data.pipeline import load_eval_split
from sycoca_jax.data.pipeline import tokenizer_from_config
from sycoca_jax.data.tokenizers import Tokenizer
from sycoca_jax.data.tokenizers import get_tokenizer
