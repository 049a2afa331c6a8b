"""Shared CLI plumbing: clear errors instead of tracebacks, one JSON line at the end."""
from __future__ import annotations

import json
import sys

from ekg_tf.errors import UserError

# Only the project's own error carries a message meant for the user; anything else
# (a ValueError or KeyError inside the library) is a bug and keeps its traceback.
USER_ERRORS = (UserError,)


def print_result(result: dict) -> None:
    """The last stdout line of every CLI: one JSON object of key results."""
    sys.stdout.flush()
    print(json.dumps(result, default=_json_default), flush=True)


def _json_default(o):
    import numpy as np
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def run_main(main_fn):
    """Wraps an absl main: user errors -> 'error: ...' on stderr + JSON + exit 2."""
    def wrapped(argv):
        try:
            return main_fn(argv)
        except USER_ERRORS as e:
            msg = str(e)
            print(f"error: {msg}", file=sys.stderr)
            print_result({"status": "error", "error": str(msg)})
            sys.exit(2)
    return wrapped
