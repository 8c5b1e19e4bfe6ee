"""What the FUSE handlers read and write through, between them and the servers.

- ``status``: ``BlockStatus``, the block status of every export, read once
  (from the image files where that answer is certain, else from qemu) and
  forgotten when an image changes;
- ``writes``: ``Writes`` and ``WriteSession``, a writer's whole life (claim
  the image, evict readers, mark what changed, bring maps up to date,
  release, invalidate the other views);
- ``maps``: ``Maps``, a view's extent map as of now;
- ``exports``: ``Exports``, every open file's lease on a server.

Importing this package imports none of them.
"""
