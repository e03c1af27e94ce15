"""The exceptions numavm raises on purpose.

`ConfigError` is the user's mistake: the command line prints its one-line
message and exits with status 2, before anything is allocated.
"""


class NumavmError(Exception):
    """Base of every error numavm reports to the user in one line."""


class ConfigError(NumavmError):
    """Bad input: the message names the option or field and what is allowed."""
