"""The FUSE side: the tree, attributes, request handlers, a mount's life.

- ``tree``: the directory tree and inode table (pure);
- ``layout``: where a source's disks and views go in the tree (pure);
- ``attrs``: owner, group and mode of every node (who may read what);
- ``operations``: the thin pyfuse3 Operations class;
- ``control``: ``snapfs refresh`` over the mount's control socket;
- ``mount``: serve a mount, and ``snapfs umount``.
"""
