r"""Text generation from any run with a language-model head (a pre-trained LM, a summarizer, an
imported or LoRA-merged model), tokens streamed to stdout as they are decoded.

  python -m infer.generate --workdir=runs/tiny --prompt="The licensee shall" --max_new=64
  python -m infer.generate --workdir=runs/tiny --prompt="..." --temperature=0.8 --top_p=0.9 \
      --seed=1 --stop=. --stop=$'\n'
  python -m infer.generate --workdir=runs/tiny --prompt="..." --beam=4 --length_penalty=0.8
  python -m infer.generate --workdir=runs/tiny --prompt="..." --no_repeat_ngram_size=3 \
      --repetition_penalty=1.2 --min_new=16
  python -m infer.generate --workdir=runs/tiny --prompts_file=prompts.jsonl --output=out.jsonl

Decoding (infer/decode.py, KV cache): greedy (default, --temperature=0), sampling
(--temperature > 0, optionally --top_k / --top_p, reproducible with --seed), or beam search
(--beam=N > 1, the highest log-probability sum / length ** --length_penalty, 1 = the mean; no
streaming: the winner is known at the end). Controls for every mode, all off by default, over
the generated tokens only (never the prompt's): --no_repeat_ngram_size=n (no n-gram twice),
--repetition_penalty=p (CTRL: a generated token's logit / p if positive, else * p),
--min_new=m (no eos before m tokens).
Each prompt is `[bos] text` (a long one keeps its head, leaving --max_new of the run's
data.seq_len); the text ends at eos, after --max_new tokens, or before the first --stop string.

One --prompt streams: the text is printed as it is decoded, --chunk tokens per compiled call
(decode.generate_chunks: 1 shows every token at once but pays a dispatch per token; larger
chunks arrive in bursts; decoding stops at the chunk where every row ended). --prompts_file
(JSONL with a "prompt" or "text" field, one per line) decodes the prompts in batches of
--batch_size and writes one JSON line {"id", "prompt", "text"} per prompt to --output (or
stdout).
"""
import json
import sys

from absl import app, flags

from infer import inputs as inputs_lib
from infer import loading
from model import errors
from model import log_setup


def read_prompts(path: str) -> list[tuple[object, str]]:
  """(id, prompt) per non-blank JSONL line; a bad line fails as `file:line: problem`."""
  try:
    lines = open(path, encoding="utf-8").read().splitlines()
  except FileNotFoundError:
    raise inputs_lib.InputError(f"--prompts_file={path}: no such file") from None
  except (OSError, UnicodeDecodeError) as e:
    raise inputs_lib.InputError(f"--prompts_file={path}: unreadable ({e})") from None
  out = []
  for lineno, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = inputs_lib.json_object(line)
    except inputs_lib.InputError as e:
      raise inputs_lib.InputError(f"{path}:{lineno}: {e}") from None
    prompt = record.get("prompt", record.get("text"))
    if not isinstance(prompt, str) or not prompt.strip():
      raise inputs_lib.InputError(f'{path}:{lineno}: expected a non-empty string "prompt" (or '
                                  '"text")')
    out.append((record.get("id", f"{path}:{lineno}"), prompt))
  if not out:
    raise inputs_lib.InputError(f"--prompts_file={path}: no prompts")
  return out


def load_generator(workdir: str) -> loading.LoadedModel:
  """The run at --workdir, if it has a language-model head (not a classifier)."""
  loaded = loading.LoadedModel.from_workdir(workdir)
  if loaded.kind == "classify":
    raise inputs_lib.InputError(f"--workdir={workdir} holds a classifier: it has no language-"
                                "model head to generate with (use infer.main / POST /classify)")
  return loaded


def check_options(loaded, max_new: int, temperature: float, top_k: int, top_p: float,
                  beam: int, no_repeat_ngram_size: int = 0, repetition_penalty: float = 1.0,
                  min_new: int = 0, length_penalty: float = 1.0):
  """InputError (naming the flag and the range it takes) for options the model cannot take."""
  limit = loaded.config.data.seq_len - 2
  problems = [
      (1 <= max_new <= limit, f"max_new={max_new}: expected 1..{limit} (data.seq_len="
                              f"{loaded.config.data.seq_len} holds the prompt and the text)"),
      (temperature >= 0, f"temperature={temperature} must be >= 0 (0: greedy)"),
      (0 <= top_k <= loaded.config.data.vocab_size,
       f"top_k={top_k}: expected 0 (off) .. {loaded.config.data.vocab_size}"),
      (0 < top_p <= 1, f"top_p={top_p}: expected (0, 1]"),
      (beam == 0 or beam >= 2, f"beam={beam}: expected 0 (off) or >= 2"),
      (beam == 0 or (temperature == 0 and top_k == 0 and top_p == 1),
       "beam search is deterministic: drop --temperature / --top_k / --top_p"),
      (0 <= no_repeat_ngram_size <= max_new,
       f"no_repeat_ngram_size={no_repeat_ngram_size}: expected 0 (off) .. max_new={max_new}"),
      (0 < repetition_penalty <= 10,
       f"repetition_penalty={repetition_penalty}: expected (0, 10] (1: off; > 1 discourages "
       "repeating generated tokens)"),
      (0 <= min_new <= max_new, f"min_new={min_new}: expected 0..max_new={max_new}"),
      (-10 <= length_penalty <= 10, f"length_penalty={length_penalty}: expected [-10, 10]"),
      (beam >= 2 or length_penalty == 1.0,
       f"length_penalty={length_penalty} applies to beam search only: add --beam"),
  ]
  for ok, message in problems:
    if not ok:
      raise inputs_lib.InputError(message)


def stream(loaded, prompt: str, max_new: int, chunk: int, options: dict) -> str:
  """Streams the prompt's continuation to stdout and returns it. On a terminal the prompt is
  shown first, so a continuation that starts mid-sentence reads as one; piped, stdout is the
  generated text alone (what --prompts_file writes as "text")."""
  if sys.stdout.isatty():
    sys.stdout.write(prompt)
  pieces = []
  for piece, in loaded.generate_stream([prompt], max_new, chunk=chunk, **options):
    sys.stdout.write(piece)
    sys.stdout.flush()
    pieces.append(piece)
  sys.stdout.write("\n")
  return "".join(pieces)


def describe(text: str, max_new: int) -> str:
  """One line for stderr saying what was generated, so that a continuation that is mostly line
  breaks (as a barely trained model's often is) reads as the model's output, not a fault."""
  words, breaks = len(text.split()), text.count("\n")
  line = (f"[generated: {words} words, {breaks} line breaks, {len(text)} characters; "
          f"--max_new={max_new} tokens at most]")
  if breaks > words:
    line += (" mostly line breaks: the model ends lines early, as a small or briefly trained "
             "one (a :tiny run) does")
  return line


def main(argv):
  log_setup.quiet_libraries()
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if (f.prompt is None) == (f.prompts_file is None):
    raise inputs_lib.InputError("give exactly one of --prompt and --prompts_file")
  prompts = read_prompts(f.prompts_file) if f.prompts_file else [(0, f.prompt)]
  loaded = load_generator(f.workdir)
  max_new = f.max_new or min(64, loaded.config.data.seq_len // 2)
  check_options(loaded, max_new, f.temperature, f.top_k, f.top_p, f.beam,
                f.no_repeat_ngram_size, f.repetition_penalty, f.min_new, f.length_penalty)
  options = dict(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p, seed=f.seed,
                 stop=tuple(f.stop or ()), no_repeat_ngram_size=f.no_repeat_ngram_size,
                 repetition_penalty=f.repetition_penalty, min_new=f.min_new)
  if f.prompt is not None and f.beam < 2 and not f.output:
    text = stream(loaded, f.prompt, max_new, f.chunk, options)
    sys.stderr.write(describe(text, max_new) + "\n")
    return
  out = open(f.output, "w", encoding="utf-8") if f.output else sys.stdout
  try:
    for start in range(0, len(prompts), f.batch_size):
      batch = prompts[start:start + f.batch_size]
      texts = loaded.generate([p for _, p in batch], max_new, beam=f.beam,
                              length_penalty=f.length_penalty, **options)
      for (doc_id, prompt), text in zip(batch, texts):
        out.write(json.dumps({"id": doc_id, "prompt": prompt, "text": text}) + "\n")
      out.flush()
  finally:
    if out is not sys.stdout:
      out.close()


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "A run with a language-model head (pre-trained LM, "
                      "summarizer, imported, LoRA or merged).", required=True)
  flags.DEFINE_string("prompt", None, "One prompt: its continuation is streamed to stdout.")
  flags.DEFINE_string("prompts_file", None, 'JSONL, a "prompt" (or "text") per line.')
  flags.DEFINE_string("output", None, "JSONL output (default: stdout).")
  flags.DEFINE_integer("max_new", None, "Tokens to generate at most (default: min(64, the "
                       "run's data.seq_len / 2)).")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set reaching this mass.")
  flags.DEFINE_integer("seed", 0, "Sampling seed (same seed, same text).")
  flags.DEFINE_integer("beam", 0, "Beam search with this many beams (0: off).")
  flags.DEFINE_float("length_penalty", 1.0, "--beam: a hypothesis scores its log-probability "
                     "sum / length ** this (1: the mean; 0: the sum, favouring short texts).")
  flags.DEFINE_integer("no_repeat_ngram_size", 0, "Never repeat an n-gram of this size within "
                       "the generated text (the prompt's n-grams stay allowed; 0: off).")
  flags.DEFINE_float("repetition_penalty", 1.0, "Tokens already generated get logit / p if "
                     "positive, else logit * p (CTRL; 1: off, > 1 discourages repeats).")
  flags.DEFINE_integer("min_new", 0, "Generate at least this many tokens before eos.")
  flags.DEFINE_multi_string("stop", None, "End the text before the first occurrence of this "
                            "string (repeatable).")
  flags.DEFINE_integer("chunk", 8, "Tokens per compiled decoding call when streaming.",
                       lower_bound=1)
  flags.DEFINE_integer("batch_size", 8, "Prompts per call with --prompts_file.", lower_bound=1)
  app.run(errors.exit_on_user_error(main))
