"""Parsing and checking the HTTP server's JSON requests (infer.serve): texts, prompts and
decoding options, or a RequestError with the status and a message naming the field."""
import json

from infer import inputs as inputs_lib


class RequestError(Exception):
  """A request the server refuses: an HTTP status and the message sent back (the OpenAI-style
  endpoints also name the offending field, `param`, and an error `code`)."""

  def __init__(self, status: int, message: str, headers: dict | None = None, *,
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.headers = status, headers or {}
    self.param, self.code = param, code


def parse_body(raw: bytes) -> dict:
  """The request's JSON object, or a RequestError naming what is wrong with the body."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RequestError(415, f"the request body is not UTF-8 (byte {e.start})") from None
  if not text.strip():
    raise RequestError(400, "the request body is empty; expected a JSON object")
  try:
    return inputs_lib.json_object(text)
  except inputs_lib.InputError as e:
    raise RequestError(400, str(e)) from None


def parse_texts(body: dict, max_batch: int, max_chars: int) -> tuple[list[str], bool]:
  """(texts, whether the request sent one "text" rather than a "texts" list), checked."""
  expected = 'expected "text" (a string) or "texts" (an array of strings)'
  unknown = sorted(set(body) - {"text", "texts"})
  if unknown:
    raise RequestError(400, f"unknown field {unknown[0]!r}; {expected}")
  if ("text" in body) == ("texts" in body):
    raise RequestError(400, f"{expected}, exactly one of them")
  single = "text" in body
  texts = [body["text"]] if single else body["texts"]
  if not isinstance(texts, list):
    raise RequestError(400, '"texts" must be an array of strings, got '
                       f"{inputs_lib.json_type(texts)}")
  if not texts:
    raise RequestError(400, '"texts" is empty')
  if len(texts) > max_batch:
    raise RequestError(413, f'"texts" has {len(texts)} entries; the limit is {max_batch} '
                       "(--max_batch)")
  for i, text in enumerate(texts):
    name = '"text"' if single else f'"texts"[{i}]'
    if not isinstance(text, str):
      raise RequestError(400, f"{name} must be a string, got {inputs_lib.json_type(text)}")
    if not text.strip():
      raise RequestError(400, f"{name} is empty")
    if len(text) > max_chars:
      raise RequestError(413, f"{name} has {len(text)} characters; the limit is {max_chars} "
                         "(--max_chars)")
  return [t.strip() for t in texts], single


# The decoding controls a request may set (LoadedModel.summarize / generate keywords; off by
# default), and the most beams one may ask for.
DECODING_OPTIONS = ("beam", "length_penalty", "no_repeat_ngram_size", "repetition_penalty",
                    "min_new")
SUMMARIZE_OPTIONS = DECODING_OPTIONS + ("length_ratio", "samples", "temperature", "top_p",
                                          "seed", "source_weight")
MAX_SAMPLES = 32     # MBR candidates per document in one request
GENERATE_OPTIONS = ("max_new", "temperature", "top_k", "top_p", "seed", "stop") + DECODING_OPTIONS
MAX_BEAM = 8


def _option(body: dict, key: str, default, kind, ok, expected: str):
  """body[key] (default if absent); a 400 naming the key and `expected` unless it is a `kind`
  (never a boolean) that passes `ok`."""
  value = body.get(key, default)
  if isinstance(value, bool) or not isinstance(value, kind) or not ok(value):
    raise RequestError(400, f'"{key}" must be {expected}, got {json.dumps(value)}')
  return value


def parse_decoding(body: dict, max_new: int) -> dict:
  """A request's decoding controls for texts of at most max_new tokens, checked."""
  beam = _option(body, "beam", 0, int, lambda v: v == 0 or 2 <= v <= MAX_BEAM,
                 f"0 (off) or an integer in 2..{MAX_BEAM}")
  length_penalty = float(_option(body, "length_penalty", 1.0, (int, float),
                                 lambda v: -10 <= v <= 10, "a number in [-10, 10]"))
  if not beam and length_penalty != 1.0:
    raise RequestError(400, '"length_penalty" applies to beam search only: set "beam" too')
  return dict(
      beam=beam, length_penalty=length_penalty,
      no_repeat_ngram_size=_option(body, "no_repeat_ngram_size", 0, int,
                                   lambda v: 0 <= v <= max_new,
                                   f"an integer in 0..{max_new} (0: off)"),
      repetition_penalty=float(_option(body, "repetition_penalty", 1.0, (int, float),
                                       lambda v: 0 < v <= 10, "a number in (0, 10] (1: off)")),
      min_new=_option(body, "min_new", 0, int, lambda v: 0 <= v <= max_new,
                      f"an integer in 0..{max_new}"))


def parse_summarize(body: dict, max_batch: int, max_chars: int,
                    max_new: int) -> tuple[list[str], bool, tuple]:
  """(texts, whether one "text" was sent, decoding options as a hashable tuple), checked."""
  texts, single = parse_texts({k: v for k, v in body.items() if k not in SUMMARIZE_OPTIONS},
                              max_batch, max_chars)
  options = parse_decoding(body, max_new)
  options["length_ratio"] = float(_option(
      body, "length_ratio", 0.0, (int, float), lambda v: 0 <= v <= 10,
      "a number in [0, 10] (0: off; else summary tokens per document token)"))
  # MBR decoding (infer/rerank.py): the consensus of "samples" sampled summaries.
  options["samples"] = _option(body, "samples", 0, int, lambda v: 0 <= v <= MAX_SAMPLES,
                               f"an integer in 0..{MAX_SAMPLES} (0: off)")
  options["temperature"] = float(_option(body, "temperature", 1.0, (int, float),
                                         lambda v: 0 < v <= 10, "a number in (0, 10]"))
  options["top_p"] = float(_option(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1,
                                   "a number in (0, 1]"))
  options["seed"] = _option(body, "seed", 0, int, lambda v: 0 <= v < 2**31,
                            "an integer in [0, 2^31)")
  options["source_weight"] = float(_option(body, "source_weight", 0.0, (int, float),
                                           lambda v: 0 <= v <= 100, "a number in [0, 100]"))
  if not options["samples"] and any(k in body for k in ("temperature", "top_p", "seed",
                                                         "source_weight")):
    raise RequestError(400, '"temperature", "top_p", "seed" and "source_weight" apply to MBR '
                       'sampling only: set "samples" too')
  return texts, single, tuple(sorted(options.items()))


def parse_generate(body: dict, max_batch: int, max_chars: int, max_new: int,
                   vocab_size: int) -> tuple[list[str], bool, tuple]:
  """(prompts, whether one "prompt" was sent, options as a hashable tuple of (name, value)
  pairs: LoadedModel.generate's keywords, max_new included), checked."""
  texts = {k: v for k, v in body.items() if k not in GENERATE_OPTIONS}
  renamed = {("text" if k == "prompt" else "texts" if k == "prompts" else k): v
             for k, v in texts.items()}
  try:
    prompts, single = parse_texts(renamed, max_batch, max_chars)
  except RequestError as e:
    message = str(e).replace('"texts"', '"prompts"').replace('"text"', '"prompt"')
    raise RequestError(e.status, message) from None
  n = _option(body, "max_new", max_new, int, lambda v: 1 <= v <= max_new,
              f"an integer in 1..{max_new} (--generate_max_new)")
  temperature = float(_option(body, "temperature", 0.0, (int, float), lambda v: 0 <= v <= 10,
                              "a number in [0, 10] (0: greedy)"))
  top_k = _option(body, "top_k", 0, int, lambda v: 0 <= v <= vocab_size,
                  f"an integer in 0..{vocab_size} (0: off)")
  top_p = float(_option(body, "top_p", 1.0, (int, float), lambda v: 0 < v <= 1,
                        "a number in (0, 1]"))
  seed = _option(body, "seed", 0, int, lambda v: 0 <= v < 2**31, "an integer in [0, 2^31)")
  stop = body.get("stop", [])
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > 16 or
      not all(isinstance(x, str) and 0 < len(x) <= 256 for x in stop)):
    raise RequestError(400, '"stop" must be a string or a list of at most 16 non-empty '
                       "strings of at most 256 characters")
  decoding = parse_decoding(body, n)
  if decoding["beam"] and (temperature or top_k or top_p != 1.0):
    raise RequestError(400, 'beam search is deterministic: drop "temperature", "top_k" and '
                       '"top_p" (or "beam")')
  options = dict(max_new=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                 stop=tuple(stop), **decoding)
  return prompts, single, tuple(sorted(options.items()))
