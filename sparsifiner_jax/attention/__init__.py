"""Attention: the mask interface (``mask``), the executors that consume it (``executors``), the fixed
patterns (``patterns``), the CPU kernels (``cpu``) and the Pallas kernels (``pallas``).

The names most callers need are re-exported here: ``attention.AttentionMask``,
``attention.get_executor(name)``, ``attention.budget(rho, N)``.
"""

from sparsifiner_jax.attention.executors import (EXECUTORS, Executor, attention_logits, attention_probs,
                                                 auto_attention, dense_attention, gather_attention,
                                                 get_executor, heads_first, masked_attention,
                                                 sigmoid_attention, softmax_attention, unmasked_attention,
                                                 weighted_values)
from sparsifiner_jax.attention.mask import (FILLS, AttentionMask, budget, indices_to_dense, keep_mask,
                                            topk_mask)

__all__ = ["EXECUTORS", "FILLS", "AttentionMask", "Executor", "attention_logits", "attention_probs",
           "auto_attention", "budget", "dense_attention", "gather_attention", "get_executor", "heads_first",
           "indices_to_dense", "keep_mask", "masked_attention", "sigmoid_attention", "softmax_attention",
           "topk_mask", "unmasked_attention", "weighted_values"]
