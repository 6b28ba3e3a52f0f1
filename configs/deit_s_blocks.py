"""Block-mode Sparsifiner DeiT-S/16 at 448 px (785 tokens): blocks of 128 query rows x 128 keys, each
keeping ``ceil(0.25 * 7) = 2`` of the 7 key blocks (``ViTConfig.mask_block``), the patches in Z-order
(``token_order="morton"``: a block is an 8 x 16 patch rectangle, not four image rows); the paper's two phases
(5 recon epochs fitting the block scores to the teacher's attention mass per block, 45 distill epochs).

  python train.py --config configs/deit_s_blocks.py --workdir /mnt/runs/deit_s_blocks \
      --config.init=weights/deit_s_448 --config.teacher.weights=weights/deit_s_448

The weights: ``python -m sparsifiner_jax.convert deit_small_patch16_224-cd65a155.pth weights/deit_s_448
--img-size 448`` (the position embedding resampled: docs/weights.md). Args: ``keep_rate``, ``mask_block``.
"""

from configs import common, deit_s_sparsifiner


def get_config(arg=None):
  a = common.parse_arg(arg, keep_rate=0.25, mask_block=128)
  c = deit_s_sparsifiner.get_config(f"keep_rate={a.keep_rate}")
  c.model.img_size = 448
  c.model.mask_block = a.mask_block
  c.model.token_order = "morton"
  return c
