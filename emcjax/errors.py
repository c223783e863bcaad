"""The one domain exception family of emcjax.

Library code raises these with a message that names the file, dataset or field, the value received and
what was expected; only the command-line runners turn them into ``sys.exit("error: ...")``.
"""


class EmcjaxError(Exception):
    """Base class of every error emcjax raises on purpose."""


class ConfigError(EmcjaxError, ValueError):
    """A configuration field or argument has a value that cannot be used."""


class DataError(EmcjaxError, ValueError):
    """An input file is missing, unreadable, corrupt or inconsistent with the configuration."""
