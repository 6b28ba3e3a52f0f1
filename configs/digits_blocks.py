"""Block-mode Sparsifiner on digits at 257 tokens (32 px, patch 2): blocks of 16 query rows x 16 keys,
each query block keeping ``ceil(0.25 * 17) = 5`` of the 17 key blocks (``ViTConfig.mask_block``), the
patches in Z-order (``token_order="morton"``: a block is a 4 x 4 patch square, not an image row).

  python train.py --config configs/digits_dense.py:img_size=32 --workdir T        # the dense teacher
  python train.py --config configs/digits_blocks.py --workdir W \
      --config.init=T/final --config.teacher.weights=T/final

Args: ``keep_rate``, ``mask_block`` (0: per-row selection at the same length, for comparison),
``distill_epochs`` (120: block mode reads 96.4 / 96.9 / 97.2 / 97.5 % at 15 / 30 / 45 / 60, and 97.5 % at
120 where a 60-epoch re-run read 97.2, against dense 98.3: BENCHMARKS.md).
"""

from configs import common, digits_sparsifiner


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.25, mask_block=16, distill_epochs=120.0)
  c = digits_sparsifiner.get_config(f"keep_rate={a.keep_rate},distill_epochs={a.distill_epochs}")
  c.model.img_size = 32
  c.model.mask_block = a.mask_block
  c.model.token_order = "morton"
  c.eval_batch_size = 120
  return c
