"""The commands' one argument style: each command's own options on an argparse parser whose `--help` lists every
option with a line of help, and whose errors are one line (UserError). Commands that also take the train command's
options (`plan`, `sft`, `bench`) parse their own first and hand the rest to `fast-srt train`'s parser (tyro, over
the typed config), whose `--help` lists those.
"""

from __future__ import annotations

import argparse
import sys

from fast_srt.errors import UserError

TRAIN_OPTIONS = ("every other option is a `fast-srt train` option (a preset first, then --section.field "
                 "overrides): `fast-srt train --help` lists them")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (what was wrong, then where the options are listed) and no prefix matching (a
    train option such as --out... must never be taken for a command's own option)."""

    def __init__(self, prog: str, description: str, takes_train_options: bool = False):
        super().__init__(prog=prog, description=description, allow_abbrev=False,
                         epilog=TRAIN_OPTIONS if takes_train_options else None,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
        self.takes_train_options = takes_train_options

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message}; `{self.prog} --help` lists the options")

    def parse_own(self, argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
        """(this command's options, the rest for the train parser). `--help` prints this command's options, and
        exits."""
        if any(a in ("-h", "--help") for a in argv):
            self.print_help(sys.stdout)
            raise SystemExit(0)
        return self.parse_known_args(argv)
