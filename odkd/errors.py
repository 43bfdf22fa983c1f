"""The one exception type for user errors: the CLI prints it as a single line, no traceback."""


class OdkdError(Exception):
    """A user-facing error; its message names the file, key or field at fault."""
