r"""Full fine-tuning classification: image encoder + linear head trained together on a copy of the weights.

  python main.py --config=configs/finetune_classification.py --workdir=/tmp/sycoca_tiny --mode=eval
  python main.py --config=configs/finetune_classification.py:model=base,steps=2000 \
      --workdir=gs://BUCKET/sycoca_base --mode=eval
  python main.py --config=configs/finetune_classification.py:runlocal --workdir=/tmp/eval_smoke   # smoke run

Sets: sklearn digits and lfw_subset (50 / 50 class-stratified splits) and built-in scene counts (2,000 train
scenes, 1,000 test scenes). Recipe (this project's choice): AdamW, lr 1e-4 for the encoder and 10x for the
new head, weight decay 0.05, 20 warmup steps then cosine decay, batch 64, `steps=` (default 300). The weights
being evaluated are never modified. Metrics: probe_finetune/<set>_finetune_acc.
"""

from configs import common
from sycoca_jax.evaluators import probe


def get_config(arg=None):
  ev = probe.default_config()
  ev.update(datasets=("sklearn_digits", "lfw_subset", "scenes_count"), methods=("finetune",), batch_size=256,
            prefix="probe_finetune")
  c, args = common.eval_run_config(arg, {"probe_finetune": ev}, steps=300, every=10**9)
  ev = c.evals.probe_finetune
  ev.finetune.update(steps=args["steps"], batch_size=64, learning_rate=1e-4, warmup_steps=20)
  ev.log_steps = args["every"]  # a cadence beyond any run: at the last training step only
  if args["runlocal"]:
    ev.update(max_examples=32, batch_size=16, log_steps=10**9)  # evaluated at the last step of a smoke run
    ev.finetune.update(steps=3, batch_size=16)
  return c
