"""The one exception type for bad user input.

Entry points catch it, print its message as a single line and exit with status 2,
before anything is written to the output directory.
"""


class UserInputError(Exception):
    """A flag, file or field given by the user is wrong; the message says which and what was expected."""
