r"""Every evaluator of the paper's five tasks on one checkpoint: the README's evaluation table.

  python main.py --config=configs/eval_all.py --workdir=/tmp/sycoca_tiny --mode=eval

Built-in scenes (retrieval with fine-grained negatives, on the test and the compositional test_comp split;
beam-search captioning; zero-shot shape / colour / digit; VQA; object-count probe) and the real offline sets
that pip packages ship (sklearn handwritten digits: zero-shot and probe; skimage lfw_subset: probe; easy-VQA).
`model=tiny|base` selects the checkpoint's geometry (default tiny); `:runlocal` for a smoke run.
"""

from configs import common
from sycoca_jax.evaluators import captioning, probe, retrieval, vqa, zeroshot


def get_config(arg=None):
  scenes = dict(name="scenes")
  evals = {
      "retrieval": retrieval.default_config(),
      "retrieval_comp": retrieval.default_config(),
      "captioning": captioning.default_config(),
      "zeroshot": zeroshot.default_config(),
      "probe": probe.default_config(),
      "vqa": vqa.default_config(),
  }
  evals["retrieval_comp"].update(split="test_comp", fine_grained=False, prefix="retrieval_comp")
  evals["captioning"].update(sampler="beam", beam_size=4)
  evals["probe"].update(methods=("ridge", "logistic"))
  for ev in evals.values():
    ev.data = dict(scenes)
  c, args = common.eval_run_config(arg, evals)
  if args["runlocal"]:
    for ev in c.evals.values():
      ev.update(max_examples=24, batch_size=16)
    c.evals.vqa.update(num_train=8, max_train_questions=32, max_test_questions=16, steps=3)
    c.evals.probe.update(num_train=16)
  for ev in c.evals.values():
    ev.log_steps = 10**9  # when used for training: at the last step only
  return c
