"""A one-file pyfuse3 file system that records lseek and fallocate calls.

Used by test_2_pyfuse3_patch to prove that the patched pyfuse3 routes both
requests to Python through a real mount. Run: python patchfs.py MOUNTPOINT LOG
"""

import errno
import os
import stat
import sys

import pyfuse3
import trio

SIZE = 1 << 20
DATA_START = 512 * 1024  # one hole, then data to the end


class PatchFS(pyfuse3.Operations):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def _attr(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        else:
            a.st_mode = stat.S_IFREG | 0o644
            a.st_size = SIZE
        a.st_uid, a.st_gid = os.getuid(), os.getgid()
        return a

    async def getattr(self, inode, ctx=None):
        return self._attr(inode)

    async def lookup(self, parent, name, ctx=None):
        if name != b"f":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh, off, size):
        return bytes(size)

    async def write(self, fh, off, buf):
        return len(buf)

    async def lseek(self, fh, off, whence):
        self._record(f"lseek {off} {whence}")
        if off >= SIZE:
            raise pyfuse3.FUSEError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            return max(off, DATA_START)
        return off if off < DATA_START else SIZE

    async def fallocate(self, fh, mode, off, length):
        self._record(f"fallocate {mode} {off} {length}")
        if mode:
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)

    def _record(self, line):
        with open(self.log, "a") as f:
            f.write(line + "\n")


def main():
    mountpoint, log = sys.argv[1:3]
    pyfuse3.init(PatchFS(log), mountpoint, {"fsname=patchfs"})
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
