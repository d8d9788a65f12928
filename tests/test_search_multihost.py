"""`python -m astraea_jax.search` over two processes (`jax.distributed`, two fake CPU devices each,
gloo collectives): the same schedule and fitness as the search run in one process on one device,
process 0 alone writes the files and reports, and both processes resume from its state file."""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

# The tiny search of tests/test_search.py's CLI test (budget 0.3 over 4 steps, 32x32, 5 frames).
ARGS = ["--quiet", "--budget", "0.3", "--steps", "4", "--size", "32x32", "--frames", "5",
        "--num-prompts", "2", "--population", "4", "--offspring", "3", "--generations", "1",
        "--min-bucket", "12", "--compile-threads", "1"]
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(**extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_", "SLURM_", "OMPI_")) and k != "XLA_FLAGS"}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", **extra)
  return env


def _search(cwd, *args, env) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "astraea_jax.search", *ARGS, *args], cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(procs: list[subprocess.Popen]) -> list[tuple[int, str, str]]:
  deadline = time.monotonic() + TIMEOUT
  results = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      results.append((p.returncode, out, err))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
      p.communicate()
    pytest.fail(f"the search did not finish within {TIMEOUT} s")
  return results


def test_two_process_search_equals_one_device(tmp_path):
  port = _free_port()
  multi = [_search(tmp_path, "--out", f"multi{i}.json", "--state", "multi.state.npz",
                   env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  single = _search(tmp_path, "--out", "single.json", "--devices", "1", env=_env())
  (rc0, out0, err0), (rc1, out1, err1), (rc, _, err) = _finish([*multi, single])
  assert rc == 0, err[-3000:]
  if rc0 or rc1:
    text = (err0 + err1).lower()
    if re.search(r"(gloo|cpu_collectives).{0,200}(not (available|supported|built|found)|"
                 r"unavailable|unknown|invalid)", text, re.S):
      pytest.skip(f"CPU cross-process (gloo) collectives unavailable: {err0[-500:]}")
  assert rc0 == 0, err0[-3000:]
  assert rc1 == 0, err1[-3000:]

  # Every device of both processes split the rows; process 0 alone wrote and reported.
  assert "4 device(s)" in err0 and "wrote multi0.json" in out0
  # gloo's own connection lines come from several threads and may interleave mid-line.
  own = re.sub(r"\[Gloo\] Rank (\d+ )?|(\d+ )?is connected to \d+ peer ranks\. Expected number of "
               r"connected peer ranks is : \d+", "", out1)
  assert not own.strip(), out1
  assert "searching" not in err1
  assert not (tmp_path / "multi1.json").exists() and (tmp_path / "multi.state.npz").exists()

  got = json.loads((tmp_path / "multi0.json").read_text())
  want = json.loads((tmp_path / "single.json").read_text())
  assert got["thetas"] == want["thetas"] and got["evaluations"] == want["evaluations"]
  np.testing.assert_allclose(got["fitness"], want["fitness"], rtol=1e-5)
  np.testing.assert_allclose(got["uniform_fitness"], want["uniform_fitness"], rtol=1e-5)
  for g, w in zip(got["history"], want["history"], strict=True):
    np.testing.assert_allclose([g["best"], g["mean"]], [w["best"], w["mean"]], rtol=1e-5)

  # Both processes resume from the finished state file process 0 wrote: the same schedule, nothing
  # evaluated again.
  port = _free_port()
  again = [_search(tmp_path, "--out", f"again{i}.json", "--state", "multi.state.npz",
                   env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  for rc, _, err in _finish(again):
    assert rc == 0, err[-3000:]
  resumed = json.loads((tmp_path / "again0.json").read_text())
  assert resumed["thetas"] == got["thetas"] and resumed["fitness"] == got["fitness"]
  assert not (tmp_path / "again1.json").exists()


def test_devices_not_a_multiple_of_processes_is_one_line_error(tmp_path):
  port = _free_port()
  procs = [_search(tmp_path, "--out", "s.json", "--devices", "3",
                   env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  for rc, _, err in _finish(procs):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and lines == ["error: --devices 3 must be a multiple of the 2 processes and at "
                                 "most 4 (all devices)"], err[-2000:]
  assert not (tmp_path / "s.json").exists()


def test_bad_output_on_process_0_stops_every_process(tmp_path):
  """Process 0 writes the files: when it cannot, the other process stops too instead of waiting
  for it in the first collective."""
  port = _free_port()
  procs = [_search(tmp_path, "--out", "missing/dir.json" if i == 0 else f"multi{i}.json",
                   env=_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                            JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  (rc0, _, err0), (rc1, _, err1) = _finish(procs)
  text = (err0 + err1).lower()
  if re.search(r"(gloo|cpu_collectives).{0,200}(not (available|supported|built|found)|"
               r"unavailable|unknown|invalid)", text, re.S):
    pytest.skip(f"CPU cross-process (gloo) collectives unavailable: {err0[-500:]}")
  assert rc0 == 1 and err0.strip().splitlines()[-1].startswith("error: output directory"), err0
  assert rc1 == 1 and "process(es) [0] failed a check" in err1.strip().splitlines()[-1], err1
