"""Errors a user can fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (a config value, a path, a missing dataset). The message names what is wrong and
    how to fix it, in one line."""
