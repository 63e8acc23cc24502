"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class MLAConvertError(Exception):
    """A problem with the user's input (missing file, bad budget, unsupported model...), not a bug."""
