r"""Zero-shot classification with prompt ensembles: built-in shape / colour / digit sets and sklearn's digits.

  python main.py --config=configs/eval_zeroshot.py --workdir=/tmp/sycoca_tiny --mode=eval
  # a SyCoCa-Base checkpoint, plus a TFDS classification set prepared on disk (array_record):
  python main.py --config=configs/eval_zeroshot.py:model=base,tfds=imagenet2012:validation \
      --workdir=gs://BUCKET/sycoca_base --mode=eval
  python main.py --config=configs/eval_zeroshot.py:runlocal --workdir=/tmp/eval_smoke   # smoke run

Each class name goes through every template of its set (the scenes' own templates; "a {}.", "the digit {}.",
"the number {}." for the digits; four photo templates for TFDS sets), the normalised text embeddings are
averaged and renormalised, and images take the most similar class. sklearn's 8 x 8 digits are drawn as dark
ink on white and upsampled to the model's image size. Chance: 1/8 shapes, 1/12 colours, 1/10 digits.
Metrics: zeroshot/<set>_top1, zeroshot/<set>_top5, zeroshot/mean_top1 (and zeroshot_tfds/... for tfds=).
"""

from configs import common
from sycoca_jax.evaluators import zeroshot


def get_config(arg=None):
  ev = zeroshot.default_config()
  ev.update(datasets=("scenes_shape", "scenes_colour", "scenes_digit", "sklearn_digits"), batch_size=256)
  c, args = common.eval_run_config(arg, {"zeroshot": ev}, tfds="", every=1000)
  if args["tfds"]:
    tfds_eval = zeroshot.default_config()
    tfds_eval.update(datasets=(f"tfds:{args['tfds']}",), batch_size=256, prefix="zeroshot_tfds")
    c.evals.zeroshot_tfds = tfds_eval
  for ev in c.evals.values():
    ev.log_steps = args["every"]
  if args["runlocal"]:
    for ev in c.evals.values():
      ev.update(max_examples=24, batch_size=16, log_steps=10**9)  # evaluated at the last step of a smoke run
  return c
