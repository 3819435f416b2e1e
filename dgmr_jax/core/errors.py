"""Errors the CLI reports as one line, without a traceback; every other exception is a bug and shows its own."""


class UserError(ValueError):
    """Bad input (a setting, a path, a file's contents): the message says what is wrong and how to fix it."""


class NonFiniteLoss(RuntimeError):
    """The loss or the state became NaN or inf; only checkpoints whose own params give a finite loss are kept."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run after saving its last step: the CLI prints the message in one line and exits 130."""
