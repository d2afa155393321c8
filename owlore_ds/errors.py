"""The one exception type for bad user input.

Entry points catch it, print its message as a single line and exit with status 2,
before anything is written to the output directory.
"""


class UserInputError(Exception):
    """A flag, file or field given by the user is wrong; the message says which and what was expected."""


class RunFailure(Exception):
    """The run cannot go on (e.g. a checkpoint could not be written on some rank). Every rank
    raises it together and entry points print it as one line and exit with status 1."""


class CheckpointError(RunFailure):
    """A checkpoint save failed on at least one rank; the message names each rank's file and reason."""
