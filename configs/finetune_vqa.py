r"""VQA by answer classification on the multimodal decoder, fine-tuned from a checkpoint (CoCa's recipe).

  python main.py --config=configs/finetune_vqa.py --workdir=/tmp/sycoca_tiny --mode=eval
  # a SyCoCa-Base checkpoint on VQAv2 (train2014 -> val2014; the official JSON files and COCO images):
  python main.py --config=configs/finetune_vqa.py:model=base,vqav2=/data/vqav2,steps=20000 \
      --workdir=gs://BUCKET/sycoca_base --mode=eval
  python main.py --config=configs/finetune_vqa.py:runlocal --workdir=/tmp/eval_smoke   # smoke run

Question sets: the built-in scenes' template questions (2,000 train scenes x 4 questions; test: 1,000 scenes)
and easy-VQA (38,575 / 9,673 questions on 64 px shape images; `pip install easy-vqa`, the data ships in the
wheel). With `vqav2=DIR`: DIR/v2_OpenEnded_mscoco_{train,val}2014_questions.json, DIR/v2_mscoco_{train,val}2014_
annotations.json, images in DIR/{train,val}2014, 3,129 most frequent answers, VQA soft accuracy.
The decoder's features, mean-pooled over the question tokens, feed a linear answer head; model and head are
trained together (AdamW, lr 1e-4, head 10x, weight decay 0.05, `steps=`, default 300 at batch 64) on a copy
of the weights. Metrics: vqa/<set>_acc.
"""

import os

from configs import common
from sycoca_jax.evaluators import vqa


def get_config(arg=None):
  ev = vqa.default_config()
  ev.update(datasets=("scenes", "easy_vqa"), pool="mean", train="all", batch_size=64, learning_rate=1e-4)
  c, args = common.eval_run_config(arg, {"vqa": ev}, steps=300, every=10**9, vqav2="")
  ev = c.evals.vqa
  ev.steps = args["steps"]
  ev.log_steps = args["every"]  # a cadence beyond any run: at the last training step only
  if args["vqav2"]:
    root = args["vqav2"]
    ev.datasets = ("vqav2",)
    ev.vqav2.update(
        train_questions=os.path.join(root, "v2_OpenEnded_mscoco_train2014_questions.json"),
        train_annotations=os.path.join(root, "v2_mscoco_train2014_annotations.json"),
        train_image_dir=os.path.join(root, "train2014"),
        test_questions=os.path.join(root, "v2_OpenEnded_mscoco_val2014_questions.json"),
        test_annotations=os.path.join(root, "v2_mscoco_val2014_annotations.json"),
        test_image_dir=os.path.join(root, "val2014"))
  if args["runlocal"]:
    ev.update(num_train=8, max_train_questions=32, max_test_questions=16, batch_size=16, steps=3,
              log_steps=10**9)  # evaluated at the last step of a smoke run
  return c
