"""Errors a user can fix: each names the file or flag at fault in one line.

CLIs catch ``UserError`` and exit with status 2 (see ``tumorseg.cli.exit_on_user_error``).
"""


class UserError(Exception):
    """Something about the user's input is wrong; the message says what and where."""


class DataError(UserError):
    """A dataset folder, annotation file or image cannot be used."""


class ConfigError(UserError):
    """A flag, config value or search-space override is invalid."""
