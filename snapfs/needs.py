"""What reading a node of the mount needs without it: ``(path, need)`` pairs.

Sources say it for the directories they lay out, views for their files
(``fs/access.py`` turns needs into owner, group and mode). Paths are paths
on the source's host; ``parents`` resolves them there. Pure.
"""

from __future__ import annotations

import os

# What a reader needs of a path: read a file, search a directory, list one;
# what a writer needs: write the file (a writable view's top image).
READ, SEARCH, LIST, WRITE = "read", "search", "list", "write"


def parents(path: str, host) -> list[str]:
    """Every directory above ``path`` on ``host``, as given and as resolved, nearest first."""
    out: dict[str, None] = {}
    for p in (os.path.abspath(path), host.realpath(path)):
        d = os.path.dirname(p)
        while True:
            out.setdefault(d)
            if d == "/":
                break
            d = os.path.dirname(d)
    return list(out)


def file_needs(path: str, host) -> tuple:
    """Reading the file ``path``: read it, search every directory above it."""
    return ((path, READ),) + tuple((d, SEARCH) for d in parents(path, host))
