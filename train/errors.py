"""The one error protocol of the pipeline: :class:`UserError`.

An error a user can fix (a config key, a data file, a directory, a checkpoint) derives
from it; its message names the problem and the fix in one sentence, and the command line
prints it as one line with exit status 2, without a traceback (``--debug`` shows it).
Any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; the message says what is wrong and what to do."""
