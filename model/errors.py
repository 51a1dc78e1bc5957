"""The one exception type the data layer raises for bad input or configuration."""


class DataError(ValueError):
  """Bad data or data config; the message names the file, folder or key at fault."""
