"""`python -m astraea_jax.search`: see `astraea_jax.search.cli`."""

import sys

from astraea_jax.search.cli import main

if __name__ == "__main__":
  sys.exit(main())
