"""The only package that speaks NBD and starts qemu processes.

- ``contexts``: metadata context names (pure);
- ``spec``: ``ExportSpec``, what one export serves (pure);
- ``client``: libnbd connections (the only importer of libnbd);
- ``qemu``: one qemu-nbd process;
- ``pool``: the server pool that owns every export of a mount;
- ``chunks``: the chunk cache and readahead of view reads.

Importing this package imports none of them.
"""
