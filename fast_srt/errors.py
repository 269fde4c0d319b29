"""The one exception type for bad input.

Raise `UserError` for anything a user can fix (a wrong path, a malformed config, a bad seed file). The CLI
prints its message as one line and exits non-zero, with no traceback. The message says what was wrong and
what to do.
"""


class UserError(Exception):
    """Bad input from the user: printed as one line by the CLI, exit code 2."""


def read_user_text(path, what: str, hint: str) -> str:
    """The UTF-8 text of a user file, or a UserError naming `what` (e.g. "seed file") and what to pass instead."""
    from pathlib import Path

    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {str(path)!r} not found; pass {hint}")
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} is not a file; pass {hint}")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {str(path)!r} ({e.strerror}); check its permissions") from None
    return decode_utf8(raw, f"{what} {str(path)!r}")


def decode_utf8(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{where} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from None
