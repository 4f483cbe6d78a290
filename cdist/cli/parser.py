"""The command line's argument parser: argparse, with three things cdist needs, all through
argparse's public interface.

- Refusals in one line, like cdist's own (``cdist: error: ... (see cdist --help)``, status 2).
- A negative number such as ``-1e-3`` is read as a value, not taken for an option (argparse
  recognises only plain negative integers and decimals, ``-3`` and ``-0.001``), so that a negative
  learning rate reaches the check that names it: such a token is passed on in its exact decimal
  form (``-0.001``), which argparse reads as a value.
- A flag given an empty value (``--out ''``, an unset shell variable) is refused, not read as
  the flag left out (which would write into the default folder).
- ``--help`` shows each flag's default (``Formatter``).
- Every flag a parser takes is recorded (``flags``), so that config files and a run folder's
  ``config.yaml`` can be checked and re-read as the flags that would set them.
"""

from __future__ import annotations

import argparse
import re
from decimal import Decimal

__all__ = ["Formatter", "Parser"]

_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and examples as written, and each flag's default after its help where it has
    one (not for switches and settings whose default is "decided later", None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = any(action.default is v for v in (None, False, argparse.SUPPRESS))
        if unset or "default" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """argparse's parser with one-line refusals, negative numbers as values and a record of its
    flags (module doc)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Formatter)
        super().__init__(*args, **kwargs)
        self.flags: dict[str, argparse.Action] = {}

    def _record(self, action: argparse.Action) -> argparse.Action:
        if action.option_strings and action.dest != "help":
            self.flags[action.dest] = action
        return action

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        return self._record(super().add_argument(*args, **kwargs))

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add = group.add_argument

        def add_recorded(*a, **k) -> argparse.Action:
            return self._record(add(*a, **k))

        group.add_argument = add_recorded
        return group

    def parse_known_args(self, args=None, namespace=None):
        if args is not None:
            args = [format(Decimal(a), "f") if _NUMBER.match(a) else a for a in args]
        parsed, rest = super().parse_known_args(args, namespace)
        for dest, action in self.flags.items():
            value = getattr(parsed, dest, None)
            if value == "" or (isinstance(value, list) and "" in value):
                message = ("an empty value (an unset shell variable?); give one, or leave the "
                           "flag out")
                if not self.exit_on_error:
                    raise argparse.ArgumentError(action, message)
                self.error(f"argument {'/'.join(action.option_strings)}: {message}")
        return parsed, rest

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
