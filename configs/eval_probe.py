r"""Linear probes on frozen image features: sklearn digits, skimage lfw_subset (face / non-face), scene counts.

  python main.py --config=configs/eval_probe.py --workdir=/tmp/sycoca_tiny --mode=eval
  python main.py --config=configs/eval_probe.py:model=base --workdir=gs://BUCKET/sycoca_base --mode=eval
  python main.py --config=configs/eval_probe.py:runlocal --workdir=/tmp/eval_smoke   # smoke run

Features: the normalised ITC image embedding (`features=pooled` or `tokens_mean` to change). Probes: closed-form
ridge regression on one-hot targets (L2 picked on a held-out fifth of train) and scikit-learn's logistic
regression. digits and lfw_subset are split 50 / 50 class-stratified; scenes_count trains on 2,000 train
scenes and tests on the 1,000 test scenes (4 classes: one to four objects; chance 0.25).
Metrics: probe/<set>_<ridge|logistic>_acc.
"""

from configs import common
from sycoca_jax.evaluators import probe


def get_config(arg=None):
  ev = probe.default_config()
  ev.update(datasets=("sklearn_digits", "lfw_subset", "scenes_count"), methods=("ridge", "logistic"),
            batch_size=256, num_train=2000)
  c, args = common.eval_run_config(arg, {"probe": ev}, features="embedding", every=1000)
  ev = c.evals.probe
  ev.features = args["features"]
  ev.log_steps = args["every"]
  if args["runlocal"]:
    ev.update(max_examples=32, batch_size=16, log_steps=10**9)  # evaluated at the last step of a smoke run
  return c
