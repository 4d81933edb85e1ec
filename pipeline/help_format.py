"""The `--help` layout every command of the project shares: the description as written, and each
option's default after its help."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help, except where there is nothing to say (a flag that is
    off, an option that is unset unless given) or the help already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help or ""
        if action.help and "default" in action.help:
            return action.help
        return super()._get_help_string(action) or ""
