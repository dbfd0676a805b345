r"""Zero-shot image-text retrieval (R@1/5/10 both ways, mTR / mIR) and the scenes fine-grained negatives check.

  # a SyCoCa-Tiny checkpoint, on the built-in scenes test split (1,000 images x 5 captions):
  python main.py --config=configs/eval_retrieval.py --workdir=/tmp/sycoca_tiny --mode=eval
  # a SyCoCa-Base checkpoint, also on COCO and Flickr30k Karpathy test (5,000 / 1,000 images x 5 captions):
  python main.py --config=configs/eval_retrieval.py:model=base,coco=/data/coco/dataset_coco.json,\
coco_images=/data/coco/images,flickr=/data/flickr30k/dataset_flickr30k.json,flickr_images=/data/flickr30k/images \
      --workdir=gs://BUCKET/sycoca_base --mode=eval
  # smoke run anywhere (random weights through --mode=train, or any tiny runlocal checkpoint):
  python main.py --config=configs/eval_retrieval.py:runlocal --workdir=/tmp/eval_smoke

`model=tiny|base` picks the geometry of configs/sycoca_tiny.py / sycoca_base.py (it must be the checkpoint's).
The same evals run during training when this config is used with --mode=train (every `every=` steps, default
1000). Paper reference (CC12M pre-training, COCO zero-shot R@1 TR / IR): CoCa 16.3 / 15.3, SyCoCa 18.7 / 17.2.
Metrics: retrieval/{i2t,t2i}_r{1,5,10}, retrieval/mTR, retrieval/mIR, retrieval/rsum and, on scenes,
retrieval/fg_{attribute,object,relation,count,mean}_{itc,loglik} (accuracy of true over perturbed caption).
"""

from configs import common
from sycoca_jax.evaluators import retrieval


def get_config(arg=None):
  scenes = retrieval.default_config()
  scenes.update(split="test", batch_size=256)
  scenes.data = dict(name="scenes")  # the built-in test split, whatever the run trains on
  evals = {"retrieval": scenes}
  c, args = common.eval_run_config(arg, evals, every=1000, coco="", coco_images="", flickr="", flickr_images="")
  every = args["every"]
  for key, name in (("coco", "coco"), ("flickr", "flickr30k")):
    if args[key]:
      ev = retrieval.default_config()
      ev.update(split="test", batch_size=256, fine_grained=False, prefix=f"retrieval_{name}")
      ev.data = dict(name="coco_json", path=args[key], image_dir=args[f"{key}_images"])
      c.evals[f"retrieval_{name}"] = ev
  for ev in c.evals.values():
    ev.log_steps = every
  if args["runlocal"]:
    for ev in c.evals.values():
      ev.update(max_examples=32, batch_size=16, log_steps=10**9)  # evaluated at the last step of a smoke run
  return c
