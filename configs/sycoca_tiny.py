r"""SyCoCa-Tiny on the built-in scenes data: the embedded default, trains on a laptop CPU in minutes.

  python main.py --config=configs/sycoca_tiny.py --workdir=/tmp/sycoca_tiny

Sized for 2 CPU cores (or any single accelerator). 48 px scenes, patch 6 (64 patches) from a small
convolutional stem, 3-layer image and 2-layer text towers of width 96, a 1-layer TG-MIM decoder, word-level
tokenizer, global batch 64. The ablation rows of the paper are the `variant=` argument (clip, coca, coca_am,
coca_mim_image_only, coca_tgmim_random, sycoca), e.g.
  python main.py --config=configs/sycoca_tiny.py:variant=coca --workdir=/tmp/coca_tiny
`:runlocal` shrinks it further to a 10-step smoke run; `:eval_split=val` evaluates on the scenes' validation
twins (to tune on; the test splits are for reporting). Measured numbers for this config are in README.md.
"""

from configs import common
from sycoca_jax import config_lib
from sycoca_jax.data import get_tokenizer

# The ablation rows `variant=` takes, in table order (python -m sycoca_jax.tools.ablation trains them).
VARIANTS = tuple(common.VARIANTS)


def get_config(arg=None):
  args = common.parse_arg(arg, variant="sycoca", runlocal=False, eval_split="test")
  c = config_lib.default_config()

  c.data.update(name="scenes", image_size=48, max_len=24, tokenizer="scenes_words", crop_scale=(0.9, 1.0))
  vocab = get_tokenizer("scenes_words", max_len=c.data.max_len).vocab_size

  m = c.model
  m.embed_dim = 64
  # A convolutional stem (masked convolution in the TG-MIM pass) and mean-pooled patch tokens: the linear patch
  # embedding and CLS token leave this ViT at chance at naming the scenes' objects within the run's budget
  # (README: "An image tower that learns objects"); the paper's linear stem is `stem="linear", pool="tok"`.
  m.vision.update(image_size=48, patch_size=6, width=96, depth=3, heads=4, stem="conv", stem_norm="instance",
                  stem_channels=(16, 16, 32, 32, 64), pool="gap")
  m.text.update(vocab_size=vocab, context_length=c.data.max_len, width=96, depth=2, heads=4)
  m.text_decoder.update(width=96, depth=2, heads=4)
  m.image_decoder.update(width=64, depth=1, heads=4)

  c.global_batch_size = 64
  c.total_steps = 1500
  c.optim.update(lr=1e-3, warmup_steps=200, weight_decay=0.05)
  c.log_steps = 50
  c.ckpt_steps = 500
  c.image_log_steps = 500
  c.evals = common.default_evals(every=500, split=args["eval_split"])

  common.apply_variant(c, args["variant"])
  if args["runlocal"]:
    common.runlocal(c)
  return c
