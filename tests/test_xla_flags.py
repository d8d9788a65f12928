"""The package's default XLA flags: added once, never over a flag the user set, and switchable off."""

import os
import subprocess
import sys

from astraea_jax.xla_flags import DEFAULT_XLA_FLAGS, apply_default_xla_flags


def test_adds_defaults_to_empty_environment():
  env = {}
  assert apply_default_xla_flags(env) == " ".join(DEFAULT_XLA_FLAGS)
  assert env["XLA_FLAGS"] == " ".join(DEFAULT_XLA_FLAGS)


def test_keeps_user_flags_and_adds_once():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  apply_default_xla_flags(env)
  apply_default_xla_flags(env)
  flags = env["XLA_FLAGS"].split()
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert flags.count("--xla_gpu_enable_triton_gemm=false") == 1


def test_user_value_wins():
  env = {"XLA_FLAGS": "--xla_gpu_enable_triton_gemm=true"}
  apply_default_xla_flags(env)
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=true"


def test_switched_off():
  env = {"ASTRAEA_DEFAULT_XLA_FLAGS": "0", "XLA_FLAGS": "--a=1"}
  apply_default_xla_flags(env)
  assert env["XLA_FLAGS"] == "--a=1"


def test_import_sets_flags_before_backend_starts():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ASTRAEA_DEFAULT_XLA_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"
  code = ("import os, astraea_jax, jax; print(os.environ['XLA_FLAGS']); "
          "print(float(jax.numpy.ones(3).sum()))")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True, timeout=120).stdout.split("\n")
  assert "--xla_gpu_enable_triton_gemm=false" in out[0].split()
  assert out[1] == "3.0"
