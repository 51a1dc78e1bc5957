"""OpenAI-compatible requests and responses for the HTTP server (infer/serve.py): a completion or
chat request checked and turned into infer/completions.py Requests; results turned into
OpenAI's response, stream-chunk and error objects. No HTTP here (infer/openai_routes.py).

What a request may set (anything else is a 400 naming the field):
  model        the served model's id, as GET /v1/models lists it (another: 404)
  prompt       /v1/completions: a string, a list of strings, a list of token ids or a list of
               such lists. Framed as the run's LM was trained ([bos] first for the project's
               own LMs; not repeated when the ids already start with it)
  messages     /v1/chat/completions: [{"role": "system"|"user"|"assistant", "content": str}],
               rendered by the imported tokenizer's chat template when it has one, else by
               the plain template "System: ...\\nUser: ...\\nAssistant: ...\\nAssistant:"
               (then "\\nUser:" and "\\nSystem:" also end the answer)
  max_tokens   tokens to generate (completions: default 16; chat, also max_completion_tokens:
               default as many as fit); at most --generate_max_new, and prompt + max_tokens
               within the run's data.seq_len
  temperature  0 (greedy: this server's default, so that a request is reproducible) .. 2;
               top_p (0, 1]
  n            choices per prompt (prompts x n <= --max_batch), sampled in one batch
  seed         sampling seed (any integer, taken mod 2^31; absent: a random one). Requests
               with equal options may share a batch, and a row's sample depends on its place
               in it: a seeded request repeats exactly when it runs alone (or in the same
               company)
  stop         a string or a list of up to 16: the text ends before the first
  stream       server-sent events, `data: {chunk}` each, then `data: [DONE]` (close-
               delimited); stream_options {"include_usage": true} adds a last chunk with the
               usage; not with echo or logprobs. An error after the first event (a timeout)
               comes as an event holding the error object
  logprobs     completions: 0..5, each token's log-probability and the k likeliest tokens
               (the legacy {"tokens", "token_logprobs", "top_logprobs", "text_offset"});
               log-probabilities of the model itself (temperature 1, no top_p)
  echo         completions: the prompt is returned before the completion, and with logprobs
               its tokens' log-probabilities too (max_tokens 0: the prompt alone;
               lm-evaluation-harness asks for 1 token and reads the prompt's). A token is
               scored after everything before it, the added framing included: only one with
               nothing before it (ids that start with [bos]) gets null
  user, presence_penalty / frequency_penalty 0, best_of = n, logit_bias {}: accepted, no effect
"""
import json
import secrets
import time
import uuid

from infer import completions
from infer.request_parsing import RequestError

MAX_STOP = 16
_IGNORED = {"user": None, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {},
            "suffix": None}
_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "seed", "stop", "stream",
           "stream_options", "best_of"} | set(_IGNORED)
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:", "\nSystem:")


def bad(message: str, param: str | None = None, status: int = 400, code: str | None = None):
  return RequestError(status, message, param=param, code=code)


def error_object(status: int, message: str, param=None, code=None) -> dict:
  kind = "invalid_request_error" if status < 500 else "server_error"
  return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body, key, default, low, high, integer=False, low_open=False):
  value = body.get(key, default)
  if value is None:
    value = default
  kinds = int if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds) or not (
      (low < value if low_open else low <= value) and value <= high):
    what = "an integer" if integer else "a number"
    raise bad(f"{key!r} must be {what} in {'(' if low_open else '['}{low}, {high}], got "
              f"{json.dumps(value)}", key)
  return value


class Context:
  """What checking a request needs to know of the server's model and limits."""

  def __init__(self, loaded, model_id: str, max_new: int, max_batch: int, max_chars: int):
    self.loaded, self.model_id, self.max_new = loaded, model_id, max_new
    self.max_batch, self.max_chars = max_batch, max_chars
    self.tok = loaded.tokenizer
    self.seq_len = loaded.config.data.seq_len
    self.vocab = loaded.config.data.vocab_size
    self.lead = completions.leading_specials(self.tok)


def check_model(body: dict, ctx: Context):
  model = body.get("model")
  if not isinstance(model, str):
    raise bad('"model" is required: a string (GET /v1/models lists the one served)', "model")
  if model != ctx.model_id:
    raise bad(f"the model {model!r} does not exist; this server serves {ctx.model_id!r}",
              "model", 404, "model_not_found")


def sampling(body: dict, ctx: Context, fields: set, extra_stop: tuple = ()) -> dict:
  """The fields common to both APIs: n, stream, include_usage and the decode options."""
  unknown = sorted(set(body) - fields)
  if unknown:
    raise bad(f"unknown field {unknown[0]!r}", unknown[0])
  for key, neutral in _IGNORED.items():
    if body.get(key) not in (None, neutral) and not (key == "user" and isinstance(body[key], str)):
      raise bad(f"{key!r} is not supported (only {json.dumps(neutral)})", key)
  check_model(body, ctx)
  n = _number(body, "n", 1, 1, ctx.max_batch, integer=True)
  if body.get("best_of") not in (None, n):
    raise bad('"best_of" is not supported (only equal to "n")', "best_of")
  temperature = float(_number(body, "temperature", 0.0, 0, 2))
  top_p = float(_number(body, "top_p", 1.0, 0, 1, low_open=True))
  seed = body.get("seed")
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
    raise bad(f'"seed" must be an integer, got {json.dumps(seed)}', "seed")
  seed = seed % 2**31 if seed is not None else (secrets.randbelow(2**31) if temperature else 0)
  stop = body.get("stop") or []
  stop = [stop] if isinstance(stop, str) else stop
  if (not isinstance(stop, list) or len(stop) > MAX_STOP or
      not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop)):
    raise bad(f'"stop" must be a string or a list of at most {MAX_STOP} non-empty strings',
              "stop")
  stream = body.get("stream") or False
  if not isinstance(stream, bool):
    raise bad('"stream" must be a boolean', "stream")
  usage = body.get("stream_options") or {}
  if not isinstance(usage, dict) or set(usage) - {"include_usage"}:
    raise bad('"stream_options" takes only {"include_usage": bool}', "stream_options")
  options = dict(temperature=temperature, top_p=top_p, seed=seed,
                 stop=tuple(stop) + tuple(s for s in extra_stop if s not in stop))
  return dict(n=n, stream=stream, include_usage=bool(usage.get("include_usage")),
              options=tuple(sorted(options.items())))


def _max_tokens(body: dict, ctx: Context, longest: int, keys=("max_tokens",), default=16):
  """max_tokens (or the first of `keys` given), checked against the prompt's room."""
  key = next((k for k in keys if body.get(k) is not None), keys[0])
  room = min(ctx.max_new, ctx.seq_len - longest)
  if room < 0 or (body.get(key) is None and room < 1):
    raise bad(f"the prompt has {longest} tokens; this model's context is {ctx.seq_len} tokens "
              "(prompt and completion together)", "prompt", code="context_length_exceeded")
  value = _number(body, key, min(default, room) if default else room, 0, ctx.max_new,
                  integer=True)
  if longest + value > ctx.seq_len:
    raise bad(f"{longest} prompt tokens + {key} {value} exceed this model's context of "
              f"{ctx.seq_len} tokens", key, code="context_length_exceeded")
  return value


def _prompt_ids(body: dict, ctx: Context) -> list[tuple[list[int], str]]:
  """(token ids as sent, text) of each prompt."""
  prompt = body.get("prompt")
  expected = ('"prompt" must be a string, a list of strings, a list of token ids or a list '
              "of such lists")
  if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(
      isinstance(t, int) and not isinstance(t, bool) for t in prompt)):
    prompt = [prompt]
  if not isinstance(prompt, list) or not prompt:
    raise bad(expected, "prompt")
  out = []
  for i, p in enumerate(prompt):
    if isinstance(p, str):
      if len(p) > ctx.max_chars:
        raise bad(f'"prompt"[{i}] has {len(p)} characters; the limit is {ctx.max_chars} '
                  "(--max_chars)", "prompt", 413)
      out.append((ctx.tok.encode(p), p))
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool)
                                           and 0 <= t < ctx.vocab for t in p):
      out.append((list(p), ctx.tok.decode(p)))
    else:
      raise bad(f"{expected}; token ids in 0..{ctx.vocab - 1}", "prompt")
  return out


def parse_completion(body: dict, ctx: Context) -> dict:
  """A /v1/completions body -> {"requests": [completions.Request], "prompts": [(ids, text)],
  "n", "stream", "include_usage", "echo", "logprobs"} (requests: prompt-major, n each)."""
  common = sampling(body, ctx, COMPLETION_FIELDS)
  prompts = _prompt_ids(body, ctx)
  if len(prompts) * common["n"] > ctx.max_batch:
    raise bad(f"{len(prompts)} prompts x n={common['n']} choices; the limit is "
              f"{ctx.max_batch} (--max_batch)", "n", 413)
  echo = body.get("echo") or False
  if not isinstance(echo, bool):
    raise bad('"echo" must be a boolean', "echo")
  logprobs = body.get("logprobs")
  if logprobs is not None:
    logprobs = _number(body, "logprobs", 0, 0, completions.MAX_LOGPROBS, integer=True)
  if common["stream"] and (echo or logprobs is not None):
    raise bad('"echo" and "logprobs" are not supported with "stream"', "stream")
  frames = [completions.framed(ctx.lead, ids) for ids, _ in prompts]
  if not all(frames):
    raise bad("the prompt is empty and this model has no start token to begin from", "prompt")
  max_new = _max_tokens(body, ctx, max(len(f) for f in frames))
  requests = [completions.Request(tuple(f), max_new, common["options"], logprobs)
              for f in frames for _ in range(common["n"])]
  return dict(common, requests=requests, prompts=prompts, echo=echo, logprobs=logprobs,
              prompt_tokens=sum(len(f) for f in frames))


def chat_prompt(messages, ctx: Context) -> tuple[str, tuple]:
  """(the prompt text, extra stop strings) of a chat: the tokenizer's template, else plain."""
  if not isinstance(messages, list) or not messages:
    raise bad('"messages" must be a non-empty list of {"role", "content"} objects', "messages")
  clean = []
  for i, m in enumerate(messages):
    content = m.get("content") if isinstance(m, dict) else None
    if isinstance(content, list):   # [{"type": "text", "text": ...}] parts
      if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                 for p in content):
        raise bad(f'"messages"[{i}].content: only text parts are supported', "messages")
      content = "".join(p["text"] for p in content)
    if not isinstance(m, dict) or m.get("role") not in PLAIN_ROLES or not isinstance(content,
                                                                                    str):
      raise bad(f'"messages"[{i}] must be {{"role": "system"|"user"|"assistant", "content": '
                "str}", "messages")
    clean.append({"role": m["role"], "content": content})
  template = getattr(ctx.tok, "chat_template", None)
  if template:
    return _render(template, clean, ctx.tok), ()
  text = "".join(f"{PLAIN_ROLES[m['role']]}: {m['content']}\n" for m in clean)
  return text + "Assistant:", PLAIN_STOP


def _render(template: str, messages: list, tok) -> str:
  import jinja2.sandbox   # only imported models carry a template

  def fail(message):
    raise bad(f"the chat template refused the messages: {message}", "messages")
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = fail
  specials = getattr(tok, "special_tokens", {})
  try:
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True,
        bos_token=specials.get("bos_token", ""), eos_token=specials.get("eos_token", ""))
  except jinja2.TemplateError as e:
    raise bad(f"the chat template failed: {e}", "messages") from None


def parse_chat(body: dict, ctx: Context) -> dict:
  """A /v1/chat/completions body -> {"requests", "prompts", "n", "stream", "include_usage"}."""
  if body.get("logprobs") or body.get("top_logprobs"):
    raise bad('"logprobs" is not supported by chat completions here: use /v1/completions',
              "logprobs")
  text, extra_stop = chat_prompt(body.get("messages"), ctx)
  common = sampling(body, ctx, CHAT_FIELDS, extra_stop)
  ids = completions.framed(ctx.lead, ctx.tok.encode(text))
  max_new = _max_tokens(body, ctx, len(ids), ("max_completion_tokens", "max_tokens"),
                        default=0)
  requests = [completions.Request(tuple(ids), max_new, common["options"])] * common["n"]
  return dict(common, requests=requests, prompts=[(ids, text)], prompt_tokens=len(ids))


# --- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(parsed: dict, results) -> dict:
  """Token counts: each prompt once (framing included) whatever n, and every choice's tokens."""
  completion = sum(len(res.ids) for res in results)
  return {"prompt_tokens": parsed["prompt_tokens"], "completion_tokens": completion,
          "total_tokens": parsed["prompt_tokens"] + completion}


def _token_texts(tok, ids: list[int]) -> list[str]:
  """Each token's text as it reads in context (decoding the ids before it too, so that a
  sentencepiece word's leading space and multi-token characters come out right)."""
  out = []
  for i in range(len(ids)):
    before = tok.decode(ids[max(0, i - 16):i])
    out.append(tok.decode(ids[max(0, i - 16):i + 1])[len(before):])
  return out


def logprobs_object(tok, prompt: tuple, result, skip: int, echo: bool) -> dict:
  """The legacy logprobs of one choice: the prompt's tokens (echo) after the `skip` framing
  tokens the server added, then the generated ones."""
  seq = list(prompt) + result.ids
  first = skip if echo else len(prompt)
  texts = _token_texts(tok, seq)[first:]
  top = []
  for j in range(first, len(seq)):
    if result.top[j] is None:
      top.append(None)
      continue
    alternatives = {}
    for t, v in result.top[j]:       # the best of several ids with one text
      alternatives.setdefault(_token_texts(tok, seq[max(0, j - 16):j] + [t])[-1], v)
    top.append(alternatives)
  offsets, at = [], 0
  for text in texts:
    offsets.append(at)
    at += len(text)
  return {"tokens": texts, "token_logprobs": result.logprobs[first:], "top_logprobs": top,
          "text_offset": offsets}


def completion_object(ctx: Context, parsed: dict, results: list) -> dict:
  choices = []
  for i, (request, result) in enumerate(zip(parsed["requests"], results)):
    ids, text = parsed["prompts"][i // parsed["n"]]
    skip = len(request.ids) - len(ids)
    choice = {"index": i, "text": (text if parsed["echo"] else "") + result.text,
              "logprobs": None, "finish_reason": result.finish_reason}
    if parsed["logprobs"] is not None:
      choice["logprobs"] = logprobs_object(ctx.tok, request.ids, result, skip, parsed["echo"])
    choices.append(choice)
  return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
          "model": ctx.model_id, "choices": choices,
          "usage": usage(parsed, results)}


def chat_object(ctx: Context, parsed: dict, results: list) -> dict:
  choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
              "logprobs": None, "finish_reason": r.finish_reason}
             for i, r in enumerate(results)]
  return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
          "model": ctx.model_id, "choices": choices,
          "usage": usage(parsed, results)}


def chunk_object(ctx: Context, chat: bool, stream_id: str, index: int, text: str | None,
                 finish_reason: str | None = None, first: bool = False) -> dict:
  """One streamed chunk: a piece of choice `index`'s text, or its finish reason."""
  if chat:
    delta = {"role": "assistant", "content": ""} if first else (
        {} if text is None else {"content": text})
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
  else:
    choice = {"index": index, "text": text or "", "logprobs": None,
              "finish_reason": finish_reason}
  return {"id": stream_id, "object": "chat.completion.chunk" if chat else "text_completion",
          "created": int(time.time()), "model": ctx.model_id, "choices": [choice]}


def models_object(ctx: Context, created: int) -> dict:
  return {"object": "list", "data": [{"id": ctx.model_id, "object": "model",
                                      "created": created, "owned_by": "legal-lm",
                                      "max_model_len": ctx.seq_len}]}
