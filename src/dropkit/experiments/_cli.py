"""Shared pieces of the experiments' command lines: one help format, one error line.

Every command (``dropkit demo``, ``dropkit uci``, ``dropkit sparse-vd``, and their
``python -m`` forms) builds its arguments with one function and formats its help with
:class:`HelpFormatter`, so that a command's help is the same whichever way it is called, and
reports errors with :func:`error`: one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["HelpFormatter", "error"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Argparse help with each default shown once, and paragraphs kept.

    * An option's default is appended as ``(default: X)`` unless its help already says what the
      default is (contains ``(default:``), or there is nothing to show: ``None`` (the help says
      what happens without the option), ``False`` (a flag) or an empty list.
    * The description and epilog keep their blank-line-separated paragraphs; each paragraph is
      wrapped to the terminal's width.
    * The list of subcommands is aligned on their longest name, so that each command's help
      starts on its own line (argparse measures subcommand names without their indentation).
    """

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if action.help is argparse.SUPPRESS:
            return
        subactions = getattr(action, "_get_subactions", None)  # only a sub-parsers action has them
        if subactions is None:
            return
        indent = self._current_indent + self._indent_increment
        for sub in subactions():
            length = len(self._format_action_invocation(sub)) + indent
            self._action_max_length = max(self._action_max_length, length)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "(default:" in text or "%(default)" in text:
            return text
        if default is None or default is False or default == [] or default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text  # bound here: a generator has no zero-argument super()
        paragraphs = [p for p in text.strip().split("\n\n") if p.strip()]
        return "\n\n".join(fill(p, width, indent) for p in paragraphs)


def error(prog: str, message: object, status: int = 2) -> int:
    """Print ``message`` as one ``PROG: error: ...`` line on stderr and return ``status``.

    A message of several lines (an exception that quotes a file, say) is joined into one.
    """
    text = " ".join(str(message).splitlines())
    print(f"{prog}: error: {text}", file=sys.stderr)
    return status
