"""One keep budget everywhere: k = ceil(rho * N) for the predictor's masks, the patterns, FLOPs and the
reported density, on a grid of token counts and keep rates (including 0.14 * 50 = 7.000000000000001)."""

import math

import jax
import numpy as np
import pytest
from flax import nnx

from sparsifiner_jax import attention, models
from sparsifiner_jax.attention import patterns
from sparsifiner_jax.evaluation import flops

# (img_size, patch_size) -> N = (img / patch)^2 + 1
GRIDS = {17: (16, 4), 37: (24, 4), 50: (28, 4), 65: (32, 4)}
RATES = (0.05, 0.1, 0.14, 0.25, 0.3, 0.5, 1.0)


def test_budget_is_the_official_float_rule():
  assert attention.budget(0.14, 50) == math.ceil(0.14 * 50) == 8     # float rounding kept, as official
  assert attention.budget(0.25, 197) == 50 and attention.budget(1.0, 197) == 197
  assert attention.budget(1e-9, 197) == 1
  with pytest.raises(ValueError, match=r"keep rate 0.0 must be in \(0, 1\]"):
    attention.budget(0.0, 10)


@pytest.mark.parametrize("n", sorted(GRIDS))
def test_predictor_patterns_flops_and_density_agree(n):
  img, patch = GRIDS[n]
  x = jax.random.normal(jax.random.key(n), (2, img, img, 3))
  for rho in RATES:
    k = attention.budget(rho, n)
    model = models.create("vit_test", keep_rate=rho, img_size=img, patch_size=patch, executor="masked",
                          rngs=nnx.Rngs(0))
    cfg = model.config
    assert cfg.num_tokens == n
    # The learned mask: every sparse row keeps exactly k keys.
    _, aux = model(x)
    mask = aux["masks"][0]
    assert mask.keys_per_row == k, (n, rho)
    rows = np.asarray(mask.sparse_rows())
    assert (rows.sum(-1) == k).all(), (n, rho)
    density = (n + (n - 1) * k) / n ** 2
    np.testing.assert_allclose(float(mask.density()), density, rtol=1e-6)
    # Analytic density and FLOPs.
    assert patterns.analytic_density(cfg) == pytest.approx(density, rel=1e-12)
    report = flops.count(cfg)
    assert report.per_layer[0]["nnz_per_head"] == n + (n - 1) * k, (n, rho)
    assert report.per_layer[0]["density"] == pytest.approx(density, rel=1e-12)
    # The fixed top-k patterns at the same keep rate.
    for name in ("oracle_topk", "random"):
      pattern_cfg = models.get_config("vit_test", keep_rate=rho, img_size=img, patch_size=patch,
                                      attention_pattern=name)
      assert patterns.build(pattern_cfg, 0, rho).nnz_per_head()[0] == n + (n - 1) * k, (name, n, rho)
      assert patterns.analytic_density(pattern_cfg) == pytest.approx(density, rel=1e-12)
