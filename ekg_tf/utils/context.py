"""Context managers shared across the library."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def attribute_set(objects, name: str, value):
    """Within it, `obj.<name> = value` for every object; each one's own value comes back
    afterwards (also when the body raises)."""
    objects = list(objects)
    saved = [getattr(o, name) for o in objects]
    try:
        for o in objects:
            setattr(o, name, value)
        yield
    finally:
        for o, v in zip(objects, saved):
            setattr(o, name, v)
