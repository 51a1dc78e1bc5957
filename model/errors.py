"""The errors a command ends with in one line, and the wrapper every command's main runs under.

A UserError is bad input or configuration - a flag, config key, file, record, run directory - or
a run that cannot go on; its message names what is at fault and what was expected. Under
`exit_on_user_error` it prints one `error: ...` line on stderr and exits with the error's
exit_code (2; a diverged training run 3) instead of a traceback wall. Anything else is a bug
and keeps its traceback. Each layer subclasses it for its own errors (DataError here,
ConfigError, LoadError, InputError, CheckpointError, EvalError, ...).
"""
import sys


class UserError(ValueError):
  exit_code = 2


class DataError(UserError):
  """Bad data or data config; the message names the file, folder or key at fault."""


def exit_on_user_error(main):
  """`main(argv)` for absl's app.run, ending a UserError in one line and its exit code."""

  def wrapped(argv):
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(e.exit_code)
  return wrapped
