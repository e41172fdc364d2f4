"""The broker's failure classes, free of D-Bus.

Each error carries a `code` that the D-Bus layer maps to a bus error name
(broker.names.error_name) and a short message meant for the caller: no paths of the
broker, no tracebacks. The message may quote what www-data wrote (an MD's names, a parse
error), so it is escaped and bounded once, here, for every exit it may reach.
"""

from .text import safe


class BrokerError(Exception):
    code = "Internal"

    def __init__(self, message: str):
        message = safe(message)
        super().__init__(message)
        self.message = message


class AccessDenied(BrokerError):
    code = "AccessDenied"


class InvalidName(BrokerError):
    code = "InvalidName"


class NothingStaged(BrokerError):
    code = "NothingStaged"


class StagingInvalid(BrokerError):
    """What is staged fails verification; `check` names the check that failed."""

    code = "StagingInvalid"

    def __init__(self, check: str, message: str):
        super().__init__(f"{check}: {message}")
        self.check = check


class RateLimited(BrokerError):
    code = "RateLimited"


class AlreadyFailed(BrokerError):
    """A restart already failed to activate exactly this staged set; only root may retry it."""

    code = "AlreadyFailed"


class InvalidArguments(BrokerError):
    code = "InvalidArguments"


class ConfigError(Exception):
    """The configuration file is unusable; the message names the key."""
