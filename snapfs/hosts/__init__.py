"""Hosts: the machine the images of a source live on.

Everything that looks at an image file (stat, resolve, open to read a
header, ask about qemu's locks), reads block status from the files, or
starts a qemu program goes through a host object, so that views, the FUSE
handlers and the write sessions never assume the images are local:

- ``local.LocalHost``: this machine (``os`` calls, ``qemu-nbd`` started here,
  libnbd on its UNIX socket);
- ``ssh.SshHost``: a hypervisor reached through ssh (its files listed and
  read with its own commands, qemu-nbd started there, the socket forwarded).

A host is compared by identity: exports (``nbd.spec.ExportSpec``) of the
same files on two hosts are two exports. ``name`` is None for this machine
(``user.snapfs.host`` is then absent), else the host as the user gave it.

The protocol every host implements (``LocalHost`` is the reference)::

    name                                    None, or the host as given
    await reach(), close()                  reach it (MountError with the reason), let go
    users, release()                        sources using it; one of them is done
    connected, error                        reachable now; why not (None)
    readahead                               chunks fetched ahead of a sequential reader
    stat(path) / lstat(path)                os.stat_result; OSError
    realpath(path), exists(path), isfile(path), islink(path), isdir(path)
    walk(root, onerror)                     as os.walk, top-down
    open(path)                              a binary file, to read a header: only a regular
                                            file or a block device, opened without blocking
                                            (OSError for a FIFO, a socket, a character device)
    forget(path)                            it was written: look again next time
    has_acl(path), locked_for_write(path)   bool
    protocol_driver(path)                   qemu's driver: file or host_device
    expect([(path, fmt, pin)])              the layers a scan found (a hint)
    layer_statuses([(path, fmt, pin)])      {key: formats.status.LayerStatus, or None: ask qemu}
    nbd_server(spec, rundir, ident, conns)  a process serving the export (nbd.qemu.QemuNBD)
    qemu_io()                               the command of a qemu-io reading commands on stdin
    reach_socket(path)                      a UNIX socket there (a backup job's) as a path here
    connect(socket, contexts, export)       a connection to it (nbd.client.Connection)
"""
