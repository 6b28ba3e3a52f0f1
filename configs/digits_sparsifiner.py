"""Sparsifiner on digits: recon then distill from a dense digits teacher (``configs/digits_dense.py``).

  python train.py --config configs/digits_sparsifiner.py --workdir W \
      --config.init=TEACHER/final --config.teacher.weights=TEACHER/final
"""

from configs import common, digits_dense


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.25, recon_epochs=10.0, distill_epochs=15.0)
  c = digits_dense.get_config()
  c.model.keep_rate = a.keep_rate
  c.model.drop_path_rate = 0.0
  c.phases.train.epochs = 0
  c.phases.recon.epochs, c.phases.recon.warmup_epochs = a.recon_epochs, 1
  c.phases.recon.lr, c.phases.recon.final_lr = 3e-3, 1e-4
  c.phases.distill.epochs, c.phases.distill.warmup_epochs = a.distill_epochs, 1
  c.phases.distill.lr, c.phases.distill.final_lr = 2e-4, 1e-6
  c.recon_reference_batch = 1
  return c
