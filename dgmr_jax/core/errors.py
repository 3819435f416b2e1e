"""Training errors the CLI reports without a traceback."""


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""
