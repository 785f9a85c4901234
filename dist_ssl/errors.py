"""The one exception type that means "the user gave us something wrong".

The CLI prints it as a single line (`dist-ssl: error: ...`) and exits with code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing folder, an unknown config key, a checkpoint that is not ours..."""
