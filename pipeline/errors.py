"""The one error base class the user is meant to see as a sentence, not a traceback.

Every ``coatnet`` sub-command turns a ``UserError`` into ``coatnet <cmd>: <message>`` on stderr
and exit status 2 (``pipeline/cli/__init__.py``). Raise (a subclass of) it for what the user can
fix: a missing or empty source, an unreadable bucket, an invalid config, too many bad inputs.
Anything else is a bug and keeps its traceback. Subclasses usually also derive from the builtin
they replace (``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so callers that catch those
keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """Something the user must fix; the message says what is wrong and what to do."""
