"""``python -m sparsifiner_jax.convert SRC DST``: the weight converter's command line.

The conversions themselves live in ``sparsifiner_jax.io`` (``io.convert``); this module only keeps the
command's name short and stable.
"""

import sys

from sparsifiner_jax.io.convert import main

if __name__ == "__main__":
  sys.exit(main())
