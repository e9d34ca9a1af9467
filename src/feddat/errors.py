"""The one error type users see: a message naming the problem and the fix; the CLI exits with code 2."""


class FedDATError(Exception):
    """A bad input (file, config, update, checkpoint) or state that the user can fix."""
