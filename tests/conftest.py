"""Test-wide settings: several fake CPU devices and strict dtype promotion.

XLA_FLAGS must be set before jax is imported anywhere, so this file sets it first.
"""

import os

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()

# The command-line tools keep a persistent compilation cache under ~/.cache by default; tests that
# call them in-process must not start one (it would hold every later compile of the worker).
os.environ["ASTRAEA_COMPILE_CACHE"] = "none"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_dtype_promotion", "strict")

ON_GPU = jax.default_backend() == "gpu"
# Pallas kernels run in interpret mode unless a GPU is present.
INTERPRET = not ON_GPU


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if "gpu_only" in item.keywords and not ON_GPU:
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
