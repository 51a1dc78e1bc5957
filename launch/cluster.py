r"""Run train.main on a TPU VM pod, a GKE cluster, a SLURM cluster or this machine.

  python -m launch.cluster tpu-pod --platform_preset=v5p-128 --name=my-tpu --zone=us-east5-a \
      --config=configs/legal_pretrain.py --workdir=/mnt/shared/runs/base
  python -m launch.cluster gke --platform_preset=2x8xh100 --image=REGISTRY/legal-lm:TAG \
      --pvc=shared-runs:/shared --config=configs/legal_pretrain.py --workdir=/shared/runs/base
  python -m launch.cluster slurm --platform_preset=2x8xh100 \
      --config=configs/legal_pretrain.py --workdir=/shared/runs/base
  python -m launch.cluster local --config=configs/legal_pretrain.py:tiny --workdir=runs/t8 --submit

A dry run by default: writes the platform's artefact (launch/templates.py) to --out_dir and
prints the command that submits it; --submit runs that command. The config flags are
train.main's own (`--config=FILE:PRESET`, `--config.key=value`), forwarded verbatim, with the
platform preset's mesh (configs/platforms.py) added as --config.mesh.* overrides unless given.
The config is loaded and checked here against the preset's device and process counts first, so
a typo or a mesh that does not multiply to the device count fails in seconds on the laptop, not
after a queue wait on the cluster (one line, exit code 2, like train.main).
"""
import os
import re
import shlex
import subprocess
import sys

from absl import app, flags

from configs import platforms
from launch import templates
from model import errors
from train import config_check
from train import cli   # train.main's --config / --workdir flags and their parser
from train.config_check import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PRESET = {"tpu-pod": "v4-32", "gke": "v5p-128", "slurm": "2x8xh100", "local": "cpu-8"}
DEFAULT_REPO_DIR = {"tpu-pod": "~/legal-lm", "gke": "/app", "slurm": REPO, "local": REPO}

_PRESET = flags.DEFINE_string(
    "platform_preset", None, f"A configs/platforms.py preset ({', '.join(platforms.PRESETS)}); "
    f"default per platform: {DEFAULT_PRESET}.")
_NAME = flags.DEFINE_string("name", None, "TPU VM name (tpu-pod) or JobSet / SLURM job name; "
                            "default: from the --workdir folder name.")
_ZONE = flags.DEFINE_string("zone", "", "tpu-pod: the TPU VM's zone (required).")
_PROJECT = flags.DEFINE_string("project", "", "tpu-pod: GCP project (default: gcloud's).")
_IMAGE = flags.DEFINE_string("image", "", "gke: container image with this repository and its "
                             "requirements installed (required).")
_PVC = flags.DEFINE_string("pvc", "", "gke: CLAIM:/mount/path - mount this PersistentVolumeClaim "
                           "(Filestore, GCS FUSE, ...) holding the shared --workdir.")
_REPO_DIR = flags.DEFINE_string("repo_dir", None, "The repository on every host or in the "
                                f"image; default: {DEFAULT_REPO_DIR}.")
_PYTHON = flags.DEFINE_string("python", None, "Python on the hosts; default python3 (this "
                              "interpreter for local).")
_PORT = flags.DEFINE_integer("port", 8476, "Coordinator port (gke, slurm).")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the artefact is written; default "
                               "runs/launch/<name>.")
_SUBMIT = flags.DEFINE_bool("submit", False, "Run the submit command instead of printing it.")
flags.mark_flags_as_required(["config", "workdir"])


def config_args(argv, remote: bool) -> list:
  """The --config tokens of `argv`, with the config file made relative to the repository (the
  hosts run from their own copy of it)."""
  out = []
  for arg in argv:
    if not arg.startswith("--config"):
      continue
    if "=" not in arg:
      raise ConfigError(f"write {arg} as {arg}=VALUE: launch.cluster forwards config flags "
                        "verbatim and needs each in one word")
    key, value = arg.split("=", 1)
    if key == "--config":
      path, sep, preset = value.partition(":")
      full = os.path.abspath(path)
      if full.startswith(REPO + os.sep):
        path = os.path.relpath(full, REPO)
      elif remote:
        raise ConfigError(f"--config={value}: the file is outside the repository, so the hosts "
                          "(which run from their copy of it) cannot read it; put it in configs/")
      else:
        path = full
      arg = f"--config={path}{sep}{preset}"
    out.append(arg)
  return out


def apply_preset(config, preset: platforms.Platform, args: list) -> list:
  """Sets the preset's mesh on `config` and returns it as overrides, except the axes `args`
  already override; then checks the config against the preset's devices and processes."""
  given = {a.split("=", 1)[0] for a in args}
  extra = []
  for axis, size in preset.mesh.items():
    if f"--config.mesh.{axis}" not in given:
      config.mesh[axis] = size
      extra.append(f"--config.mesh.{axis}={size}")
  try:
    config_check.validate(config, preset.num_devices, preset.num_processes)
  except ConfigError as e:
    raise ConfigError(f"platform preset {preset.name} ({preset.num_devices} devices in "
                      f"{preset.num_processes} processes): {e}") from None
  return extra


def workdir_arg(workdir: str, remote: bool) -> str:
  if "://" in workdir:
    raise ConfigError(f"--workdir={workdir}: train.main writes through the filesystem; mount the "
                      "bucket (e.g. GCS FUSE) on every host and give the mount path")
  if not remote:
    return os.path.abspath(os.path.expanduser(workdir))
  if not workdir.startswith(("/", "~")):
    raise ConfigError(f"--workdir={workdir}: every host must see the same run folder; give an "
                      "absolute path on a shared filesystem, not a relative one")
  return workdir


def job_name(name: str | None, workdir: str) -> str:
  """A DNS-1123 label (JobSet pods and TPU VMs need one), short enough for pod host names."""
  if name is None:
    base = re.sub(r"[^a-z0-9-]+", "-", os.path.basename(workdir.rstrip("/")).lower())
    base = base.strip("-")[:36].rstrip("-")
    name = base if base[:1].isalpha() else f"lm-{base}".rstrip("-")
  if not re.fullmatch(r"[a-z]([-a-z0-9]{0,38}[a-z0-9])?", name):
    raise ConfigError(f"--name={name}: expected lowercase letters, digits and '-', starting with "
                      "a letter, at most 40 characters")
  return name


def make_job(platform: str, config, argv, workdir: str, preset_name: str | None = None,
             **options) -> templates.Job:
  """The Job for `platform` from train.main's flags in `argv` and the loaded `config`; options
  are Job fields (name, zone, project, image, repo_dir, python, port) to set."""
  if platform not in templates.PLATFORMS:
    raise ConfigError(f"unknown platform {platform!r}; expected one of "
                      f"{sorted(templates.PLATFORMS)}")
  preset_name = preset_name or DEFAULT_PRESET[platform]
  if preset_name not in platforms.PRESETS:
    raise ConfigError(f"unknown --platform_preset={preset_name!r}; expected one of "
                      f"{sorted(platforms.PRESETS)} (configs/platforms.py)")
  preset = platforms.PRESETS[preset_name]
  kinds = templates.PLATFORMS[platform][3]
  if preset.kind not in kinds:
    raise ConfigError(f"--platform_preset={preset_name} is a {preset.kind} preset; {platform} "
                      f"runs {' or '.join(kinds)} presets")
  remote = platform != "local"
  args = config_args(argv, remote)
  args += apply_preset(config, preset, args)
  args.append(f"--workdir={workdir_arg(workdir, remote)}")
  options = {k: v for k, v in options.items() if v is not None}
  options["name"] = job_name(options.get("name"), workdir)
  options.setdefault("repo_dir", DEFAULT_REPO_DIR[platform])
  options.setdefault("python", "python3" if remote else sys.executable)
  options.setdefault("port", 8476)
  required = {"tpu-pod": "zone", "gke": "image"}.get(platform)
  if required and not options.get(required):
    raise ConfigError(f"{platform} needs --{required}")
  pvc = options.get("pvc")
  if pvc and (platform != "gke" or not re.fullmatch(r"[a-z0-9.-]+:/\S*", pvc)):
    raise ConfigError(f"--pvc={pvc}: expected CLAIM:/mount/path, and only for gke")
  return templates.Job(platform=platform, preset=preset, train_args=tuple(args), **options)


def write(job: templates.Job, out_dir: str) -> list:
  """Writes the job's artefact into out_dir; returns the command that submits it."""
  render, file_name, submit, _ = templates.PLATFORMS[job.platform]
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, file_name)
  with open(path, "w") as f:
    f.write(render(job))
  if file_name.endswith((".sh", ".sbatch")):
    os.chmod(path, 0o755)
  return [*submit, path]


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("expected one platform: python -m launch.cluster "
                         f"{{{','.join(templates.PLATFORMS)}}} --config=... --workdir=...")
  flag_values = flags.FLAGS
  job = make_job(argv[1], flag_values.config, sys.argv[1:], flag_values.workdir,
                 _PRESET.value, name=_NAME.value, zone=_ZONE.value, project=_PROJECT.value,
                 image=_IMAGE.value, pvc=_PVC.value, repo_dir=_REPO_DIR.value,
                 python=_PYTHON.value, port=_PORT.value)
  command = write(job, _OUT_DIR.value or os.path.join("runs", "launch", job.name))
  print(f"wrote {command[-1]}\n{job.header(comment='')}")
  if not _SUBMIT.value:
    print(f"submit with:\n  {shlex.join(command)}")
    return
  print(f"submitting: {shlex.join(command)}", flush=True)
  sys.exit(subprocess.call(command))


if __name__ == "__main__":
  app.run(errors.exit_on_user_error(main), flags_parser=cli.parse_flags)
