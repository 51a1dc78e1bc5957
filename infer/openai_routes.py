"""The OpenAI-compatible endpoints of infer/serve.py over its request handler: /v1/completions,
/v1/chat/completions (JSON, or server-sent events with "stream": true), /v1/models, and the
tokenizer endpoints lm-evaluation-harness's `local-completions` model reads (vLLM's
/tokenizer_info, /tokenize, /detokenize), so that it sends token ids and scores exactly what
the project's own harness (infer/harness.py) scores.

Every generation goes through the server's `complete(requests, timeout)`: one call into its
generation engine (infer/completions.py)."""
import dataclasses
import queue
import threading

from infer import openai_api
from infer.request_parsing import RequestError

# The special-token texts /tokenize maps to their ids (the sentencepiece defaults; an HF
# tokenizer matches its own special tokens when it encodes).
_SP_SPECIALS = ("<s>", "</s>")


def _context(handler) -> openai_api.Context:
  ctx = handler.server.openai
  if ctx is None:
    raise openai_api.bad(f"this server runs a {handler.server.loaded.kind} model, which has no "
                         "language-model head: it serves no /v1 generation (use /"
                         f"{handler.server.loaded.kind})", None, 404, "model_not_found")
  return ctx


def models(handler) -> dict:
  ctx = _context(handler)
  return openai_api.models_object(ctx, handler.server.started)


def completions(handler) -> dict | None:
  ctx = _context(handler)
  parsed = openai_api.parse_completion(handler.read_json(), ctx)
  if parsed["stream"]:
    return _stream(handler, ctx, parsed, chat=False)
  results = handler.server.complete(parsed["requests"], handler.remaining())
  return openai_api.completion_object(ctx, parsed, results)


def chat_completions(handler) -> dict | None:
  ctx = _context(handler)
  parsed = openai_api.parse_chat(handler.read_json(), ctx)
  if parsed["stream"]:
    return _stream(handler, ctx, parsed, chat=True)
  results = handler.server.complete(parsed["requests"], handler.remaining())
  return openai_api.chat_object(ctx, parsed, results)


def _stream(handler, ctx, parsed: dict, chat: bool) -> None:
  """Answers with server-sent events as the text is decoded; None: the reply is written."""
  events = queue.Queue()
  requests = [dataclasses.replace(r, sink=lambda piece, i=i: events.put((i, piece)))
              for i, r in enumerate(parsed["requests"])]
  outcome = {}
  timeout = handler.remaining()

  def run():
    try:
      outcome["results"] = handler.server.complete(requests, timeout)
    except Exception as e:   # reported in the stream: the 200 is already sent
      outcome["error"] = e
    finally:
      events.put(None)
  threading.Thread(target=run, name="stream", daemon=True).start()
  stream_id = openai_api.new_id("chatcmpl" if chat else "cmpl")
  chunk = lambda *args, **kw: openai_api.chunk_object(ctx, chat, stream_id, *args, **kw)
  handler.start_events()
  if chat:
    for i in range(len(requests)):
      handler.send_event(chunk(i, None, first=True))
  while (item := events.get()) is not None:
    handler.send_event(chunk(*item))
  if "error" in outcome:
    status, message = handler.server.error_status(outcome["error"])
    handler.send_event(openai_api.error_object(status, message))
  else:
    for i, result in enumerate(outcome["results"]):
      handler.send_event(chunk(i, None, result.finish_reason))
    if parsed["include_usage"]:
      handler.send_event({**chunk(0, None), "choices": [],
                          "usage": openai_api.usage(parsed, outcome["results"])})
  handler.send_event("[DONE]")
  return None


# --- the remote tokenizer lm-evaluation-harness reads ----------------------------------------
def _specials(tok) -> dict:
  """{"bos_token": text, "eos_token": text} of the run's tokenizer."""
  named = getattr(tok, "special_tokens", None)
  if named is not None:
    return {k: named.get(k) for k in ("bos_token", "eos_token")}
  return {"bos_token": _SP_SPECIALS[0], "eos_token": _SP_SPECIALS[1]}


def tokenizer_info(handler) -> dict:
  ctx = _context(handler)
  template = getattr(ctx.tok, "chat_template", None)
  return {**_specials(ctx.tok), "pad_token": None, "chat_template": template,
          "model_max_length": ctx.seq_len, "tokenizer_class": ctx.tok.kind}


def tokenize(handler) -> dict:
  """{"prompt": str, "add_special_tokens": bool} -> {"tokens", "count", "max_model_len"}.
  add_special_tokens prepends the framing the model reads every prompt after."""
  ctx = _context(handler)
  body = handler.read_json()
  text = body.get("prompt")
  if not isinstance(text, str):
    raise RequestError(400, '"prompt" must be a string')
  specials = _specials(ctx.tok)
  if text in (specials["bos_token"], specials["eos_token"]) and ctx.tok.kind != "hf":
    ids = [ctx.tok.bos_id if text == specials["bos_token"] else ctx.tok.eos_id]
  else:
    ids = ctx.tok.encode(text)
  if body.get("add_special_tokens"):
    ids = ctx.lead + ids
  return {"tokens": ids, "count": len(ids), "max_model_len": ctx.seq_len}


def detokenize(handler) -> dict:
  ctx = _context(handler)
  ids = handler.read_json().get("tokens")
  if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                          for t in ids):
    raise RequestError(400, '"tokens" must be a list of token ids')
  return {"prompt": ctx.tok.decode(ids)}


ROUTES = {"/v1/models": ("GET", models),
          "/v1/completions": ("POST", completions),
          "/v1/chat/completions": ("POST", chat_completions),
          "/tokenizer_info": ("GET", tokenizer_info),
          "/tokenize": ("POST", tokenize),
          "/detokenize": ("POST", detokenize)}
