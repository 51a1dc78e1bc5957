"""Reading Hugging Face safetensors checkpoints (one file, or the shards an index lists) tensor
by tensor, for train.hf.convert: each read seeks to one tensor's bytes, so only it is in memory."""
import glob
import json
import os

import numpy as np

from train.hf import families
from train.hf.families import ConvertError

_DTYPES = ("F32", "F16", "BF16", "F64")


class SafetensorsReader:
  """Tensors by name from one model.safetensors or the shards its index lists. Each read seeks
  to one tensor's bytes (the safetensors layout: a JSON header of names, dtypes, shapes and
  offsets, then the raw data), so only the tensor asked for is in memory."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    else:
      paths = sorted(glob.glob(os.path.join(hf_dir, "*.safetensors")))
      if not paths:
        raise ConvertError(f"--hf_dir={hf_dir}: no *.safetensors files (convert .bin weights "
                           "with transformers' save_pretrained(safe_serialization=True))")
      self.files = {name: path for path in paths for name in _header(path)[0]
                    if name != "__metadata__"}
    self.bytes = sum(os.path.getsize(p) for p in set(self.files.values()))

  def resolve(self, name: str):
    """The stored name for `name`: checkpoints saved from the base model lack the prefix, and
    BERT-era ones (bert-base-uncased's own) name LayerNorm weights gamma and beta."""
    old = {"LayerNorm.weight": "LayerNorm.gamma", "LayerNorm.bias": "LayerNorm.beta"}
    spellings = [name] + [name[:-len(new)] + was for new, was in old.items()
                          if name.endswith(new)]
    for spelling in spellings:
      if spelling in self.files:
        return spelling
      for prefix in ("model.",) + tuple(families.PREFIX.values()):
        if spelling.startswith(prefix) and spelling[len(prefix):] in self.files:
          return spelling[len(prefix):]
    return None

  def read(self, name: str) -> np.ndarray:
    """The tensor as float32 (bf16/f16 upcast exactly)."""
    path = self.files[name]
    self.read_dtype_check(name)
    # Read with a plain seek + read rather than through safe_open's memory map: mapped pages
    # would stay resident until the file is closed, adding the whole checkpoint to peak memory.
    return _read_raw(path, name).astype(np.float32, copy=False)

  def shape(self, name: str) -> tuple:
    return tuple(_header(self.files[name])[0][name]["shape"])

  def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
    """Rows start:stop (first axis) of the tensor as float32: a block of a large one."""
    self.read_dtype_check(name)
    return _read_raw(self.files[name], name, start, stop).astype(np.float32, copy=False)

  def read_dtype_check(self, name: str):
    dtype = _stored_dtype(self.files[name], name)
    if dtype not in _DTYPES:
      raise ConvertError(f"tensor {name} in {os.path.basename(self.files[name])} has dtype "
                         f"{dtype}; expected one of {', '.join(_DTYPES)}")


_HEADERS = {}


def _header(path: str) -> tuple[dict, int]:
  stat = os.stat(path)
  key = (path, stat.st_mtime_ns, stat.st_size)   # a file rewritten in place is read afresh
  if key not in _HEADERS:
    with open(path, "rb") as f:
      n = int.from_bytes(f.read(8), "little")
      _HEADERS[key] = (json.loads(f.read(n)), 8 + n)
  return _HEADERS[key]


def _stored_dtype(path: str, name: str) -> str:
  return _header(path)[0][name]["dtype"]


def _read_raw(path: str, name: str, row_start: int = 0, row_stop: int | None = None
              ) -> np.ndarray:
  """The tensor (or its rows row_start:row_stop) in its stored dtype (the safetensors layout:
  little-endian, C order, at data_offsets after the JSON header); numpy has no bfloat16,
  ml_dtypes (a jax dependency) does."""
  import ml_dtypes
  header, start = _header(path)
  info = header[name]
  begin, end = info["data_offsets"]
  dtype = np.dtype({"F32": np.float32, "F16": np.float16, "F64": np.float64,
                    "BF16": ml_dtypes.bfloat16}[info["dtype"]]).newbyteorder("<")
  shape = list(info["shape"])
  if row_stop is not None:
    row_bytes = dtype.itemsize * int(np.prod(shape[1:]))
    begin, end = begin + row_start * row_bytes, begin + row_stop * row_bytes
    shape[0] = row_stop - row_start
  out = np.empty(shape, dtype)
  with open(path, "rb") as f:   # straight into the array: no intermediate bytes object
    f.seek(start + begin)
    if f.readinto(memoryview(out.reshape(-1).view(np.uint8))) != end - begin:
      raise ConvertError(f"tensor {name} in {os.path.basename(path)} is truncated")
  return out
