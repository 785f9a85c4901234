"""The one exception type that means "the user gave us something wrong".

The CLI prints it as a single line (`dist-ssl: error: ...`) and exits with code 2; anything else
is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: a missing folder, an unknown config key, a checkpoint that is not ours..."""


def check_config(ok: bool, key: str, message: str) -> None:
    """A config value's own check (in a section's `__post_init__`): one line naming the key."""
    if not ok:
        raise UserError(f"config key '{key}' {message}")
