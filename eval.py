"""Evaluate a checkpoint:

  python eval.py --config configs/digits_sparsifiner.py --workdir DIR [--weights W | --step N|latest] \
      [--out F.json] [--config.model.keep_rate=0.1] [--config.input.eval_split=test]
"""

from sparsifiner_jax.cli import entry

if __name__ == "__main__":
  entry.run_main("eval")
