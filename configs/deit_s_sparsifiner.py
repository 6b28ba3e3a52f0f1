"""The paper's recipe on ImageNet: Sparsifiner DeiT-S/16, keep 0.25, 5 recon + 45 distill epochs.

  python train.py --config configs/deit_s_sparsifiner.py --workdir /mnt/runs/deit_s \
      --config.init=weights/deit_s --config.teacher.weights=weights/deit_s

Args (``--config configs/deit_s_sparsifiner.py:keep_rate=0.1``): ``keep_rate``, ``variant`` (timm name).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.25, variant="deit_small_patch16_224")
  c = common.base_config()
  c.model_name = a.variant
  c.model.keep_rate = a.keep_rate
  c.input = common.input_config("imagenet2012", eval_split="validation")
  c.batch_size = 1344
  c.phases.recon.epochs, c.phases.recon.warmup_epochs = 5, 3
  c.phases.distill.epochs, c.phases.distill.warmup_epochs = 45, 3
  return c
