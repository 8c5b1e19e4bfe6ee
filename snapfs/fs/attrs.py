"""File attributes, and who may read what (docs/views.md, "Who may read what").

A mount never widens access to the disks it shows. Every node takes its owner,
group and permission bits from the files whose data (or names) it shows:

- a view and its map: the images the view reads (a layer view its layer; a
  chain or dirty view every layer of the chain, top first);
- a disk's directory and its ``chain/``, ``layers/``, ``dirty/``: the leaf
  image; a directory that mirrors one of the image directory's: that
  directory; the root: the image directory.

Owner and group are the first file's. The bits are those that *every* file
grants to whoever holds that class on the node. When a lower file has
another owner or group, snapfs cannot know who is in which group, so it takes
the least that class could get there::

    node class   file with the same owner/group   file with another owner/group
    owner        u                                 g & o       (not the file's owner)
    group        g  (& u if not the same owner)    g & o (& u)
    other        o  (& u, & g likewise)            u & g & o

A mount that is not writable clears the write bits, and execute bits of files
(disk images are not programs); a directory is searchable by a class exactly
when it is readable. The kernel checks these (``default_permissions``), so
with ``--allow-other`` a user who cannot read ``vm1/disk.qcow2`` cannot read
its views either. A file that cannot be stat'ed grants nothing.
"""

from __future__ import annotations

import os
import stat

import pyfuse3

from .tree import Directory, Node, Tree, ViewNode

FILE_MASK = 0o444  # read-only mounts


def access(paths) -> tuple[int, int, int]:
    """``(uid, gid, mode bits)`` for a node showing the data of ``paths`` (first decides owner)."""
    sts = []
    for p in paths:
        try:
            sts.append(os.stat(p))
        except OSError:
            return 0, 0, 0
    if not sts:
        return 0, 0, 0
    uid, gid = sts[0].st_uid, sts[0].st_gid
    owner = group = other = 7
    for st in sts:
        m = stat.S_IMODE(st.st_mode)
        u, g, o = m >> 6 & 7, m >> 3 & 7, m & 7
        same_u, same_g = st.st_uid == uid, st.st_gid == gid
        owner &= u if same_u else g & o
        group &= g & (7 if same_u else u) & (7 if same_g else o)
        other &= o & (7 if same_u else u) & (7 if same_g else g)
    return uid, gid, owner << 6 | group << 3 | other


def node_paths(node: Node) -> tuple[str, ...] | None:
    """The files whose permissions ``node`` takes, or None (the mount's owner, 0555/0444)."""
    if isinstance(node, ViewNode):
        view = node.view
        seen: dict[str, None] = {}
        for spec in view.specs():
            for path, _ in spec.layers:
                seen.setdefault(path)
        return tuple(seen)
    return node.paths


def _ownership(tree: Tree, node: Node) -> tuple[int, int, int]:
    cached = node.access
    if cached is None:
        paths = node_paths(node)
        if paths is None:
            cached = (tree.uid, tree.gid, 0o555)
        else:
            cached = access(paths)
        node.access = cached
    return cached


def entry(tree: Tree, node: Node, size: int = 0, blocks: int = 0,
          mtime_ns: int | None = None, timeout: float = 300) -> pyfuse3.EntryAttributes:
    a = pyfuse3.EntryAttributes()
    a.st_ino = node.inode
    a.generation = 0
    a.entry_timeout = timeout
    a.attr_timeout = timeout
    uid, gid, bits = _ownership(tree, node)
    if isinstance(node, Directory):
        readable = bits & 0o444
        a.st_mode = stat.S_IFDIR | readable | readable >> 2
        a.st_nlink = 2 + sum(isinstance(c, Directory) for c in node.children.values())
    else:
        a.st_mode = stat.S_IFREG | bits & FILE_MASK
        a.st_nlink = 1
    a.st_size = size
    a.st_blocks = blocks
    a.st_blksize = 4 << 20  # cp, cat, tar read this much at a time
    a.st_uid = uid
    a.st_gid = gid
    t = mtime_ns if mtime_ns is not None else tree.mtime_ns
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = t
    return a
