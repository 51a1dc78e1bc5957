r"""Run N cooperating JAX processes on this machine (multi-host training, tested on CPU).

  python -m launch.local --num_processes=2 --devices_per_process=2 -- \
      --config=configs/legal_pretrain.py:tiny --workdir=/tmp/lm2

Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
train.main passes to `jax.distributed.initialize`, and its own fake CPU devices. Output of every
process is prefixed with its id; the launcher exits with the first non-zero exit code, and
forwards SIGTERM/SIGINT to all processes (so a preempted job still checkpoints).
"""
import os
import re
import signal
import subprocess
import sys
import threading

import portpicker
from absl import app, flags

from model import errors

_NUM = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "Fake CPU devices per process.")
_MODULE = flags.DEFINE_string("module", "train.main", "Python module each process runs.")


def process_env(process_id: int, num_processes: int, port: int, devices: int) -> dict:
  env = dict(os.environ)
  # The caller's other XLA flags reach every process; only the device count is ours.
  xla_flags = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "",
                     env.get("XLA_FLAGS", ""))
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id), JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{xla_flags} --xla_force_host_platform_device_count={devices}".strip())
  return env


def _pump(proc, prefix):
  for line in proc.stdout:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def launch(args, num_processes: int, devices_per_process: int, module: str = "train.main") -> int:
  port = portpicker.pick_unused_port()
  procs = []
  for i in range(num_processes):
    procs.append(subprocess.Popen(
        [sys.executable, "-m", module, *args], env=process_env(i, num_processes, port,
                                                               devices_per_process),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  pumps = [threading.Thread(target=_pump, args=(p, i), daemon=True) for i, p in enumerate(procs)]
  for t in pumps:
    t.start()

  def forward(signum, frame):
    del frame
    for p in procs:
      p.send_signal(signum)
  previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    codes = [p.wait() for p in procs]
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
  for t in pumps:
    t.join()
  return next((c for c in codes if c), 0)


def main(argv):
  sys.exit(launch(argv[1:], _NUM.value, _DEVICES.value, _MODULE.value))


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main))
