"""The FUSE side: the tree, attributes, request handlers, a mount's life.

- ``tree``: the directory tree and inode table (pure);
- ``layout``: where a source's disks and views go in the tree (pure);
- ``access``: who may read what: owner, group and mode of every node (pure);
- ``attrs``: every node's attributes, reading view maps when needed;
- ``operations``: the thin pyfuse3 Operations class;
- ``control``: ``snapfs refresh`` over the mount's control socket;
- ``mount``: serve a mount, and ``snapfs umount``.
"""
