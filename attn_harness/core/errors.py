"""One exception type for every user-facing failure.

Raise ``HarnessError`` with a message that names the file, line or key at fault and what to
do about it; the CLI prints it as one line and exits 2, the pytest plugin reports it as a
collection error or a failed item, never as a traceback.
"""


class HarnessError(Exception):
    """A problem with the user's input (file, flag, spec, checkpoint) rather than a bug."""

