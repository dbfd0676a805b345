r"""Captioning fine-tuning on COCO (Karpathy splits): caption loss only, from a pretrained SyCoCa-Base.

  python main.py --config=configs/captioning_coco.py:init=/path/to/sycoca_base_workdir \
      --workdir=/path/to/captioning_coco \
      --config.data.path=/data/coco/dataset_coco.json --config.data.image_dir=/data/coco/images
  # smoke run on the built-in scenes, anywhere (random init unless init= is given):
  python main.py --config=configs/captioning_coco.py:runlocal --workdir=/tmp/captioning_smoke

What it does: loads every tower of the pretraining checkpoint (`init=` workdir, latest step; `init_step=N`
for another), then trains the captioner with the IC loss alone (itc_weight = mim_weight = 0) and no masking:
the decoder sees every patch, as it does when generating. Karpathy train + restval (113,287 images, one of
their 5 captions sampled per visit), 5 epochs at global batch 128 (~4.4k steps), AdamW lr 1e-5 with 500
warmup steps and cosine decay, weight decay 0.05, bf16 compute. CoCa fine-tunes captioning the same way
(caption loss only, small lr); the SyCoCa paper does not give its captioning recipe, so these values are
this project's choice.

Data: `dataset_coco.json` (Karpathy & Fei-Fei's split file) and the COCO 2014 train/val images; the file's
`filepath` entries (train2014 / val2014) are taken relative to data.image_dir.

Evals: beam search (4 beams, GNMT alpha 0.6) on the first 1,000 Karpathy val images every 1,000 steps
(no METEOR), and on the 5,000 Karpathy test images at the last step (BLEU-4, METEOR, ROUGE-L, CIDEr-D; set
--config.evals.captioning_test.predictions_path=FILE.json to keep the captions). Hardware: one 8-chip TPU / GPU host fits it (16 images per chip).
This config has not been run to completion here: no result is claimed for it.
"""

from configs import common
from sycoca_jax import config_lib


def get_config(arg=None):
  args = common.parse_arg(arg, init="", init_step=-1, runlocal=False)
  c = config_lib.default_config()   # CoCa-Base geometry, as configs/sycoca_base.py

  c.model.dtype = "bfloat16"
  c.model.masking.update(strategy="none", ic_ratio=0.0, mim_ratio=0.0)
  c.loss.update(itc_weight=0.0, ic_weight=1.0, mim_weight=0.0)

  c.data.update(name="coco_json", path="/data/coco/dataset_coco.json", image_dir="/data/coco/images",
                split="train", image_size=288, max_len=76, tokenizer="clip_bpe", crop_scale=(0.9, 1.0))
  c.global_batch_size = 128
  c.num_train_examples = 113_287
  c.total_epochs = 5
  c.optim.update(lr=1e-5, warmup_steps=500, weight_decay=0.05, b1=0.9, b2=0.98, eps=1e-6)
  c.log_steps = 50
  c.ckpt_steps = 1000
  c.image_log_steps = 0

  if args["init"]:
    c.init_from.update(workdir=args["init"], step=args["init_step"], towers=())

  sampler = dict(type="captioning", sampler="beam", beam_size=4, alpha=0.6, min_len=0, max_len=0,
                 tokenization="ptb", batch_size=64)
  c.evals.captioning_val = dict(sampler, split="val", max_examples=1000, meteor=False, log_steps=1000,
                                prefix="captioning_val")
  # A cadence beyond the run's length: evaluated at the last step only (and by --mode=eval).
  c.evals.captioning_test = dict(sampler, split="test", max_examples=0, meteor=True, log_steps=10**9,
                                 prefix="captioning_test", predictions_path="")

  if args["runlocal"]:
    common.runlocal(c)
    c.model.masking.update(strategy="none", ic_ratio=0.0, mim_ratio=0.0)
    for ev in c.evals.values():
      ev.update(split="test", max_examples=16, batch_size=16, beam_size=2, meteor=False)
  return c
