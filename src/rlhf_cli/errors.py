"""The one exception a user should see: a clear sentence, exit code 2, no traceback."""


class UserError(Exception):
    """A problem with the user's recipe, data, paths or models, explained in one paragraph.

    The CLI catches it, prints the message and exits with code 2.
    """
