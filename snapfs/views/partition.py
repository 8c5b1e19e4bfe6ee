"""Partition views: one partition of a chain view, as a file of its own.

``partitions/NAME/pK.raw`` reads exactly the bytes of partition K of the
chain view ``chain/NAME.raw``; its map is the chain view's, restricted to
the partition and shifted to start at 0 (the same rules: a hole reads as
zero). Reads and block status go to the chain view's export, at the
partition's offset. The partition table is read by util-linux's ``sfdisk``
(``fs/partitions.py``), never by snapfs.
"""

from __future__ import annotations

from .. import extents as ex
from .chain import ChainView

# MBR types of an extended partition: a container of logical partitions, not
# a file system (Linux shows it as a 1 KiB device).
EXTENDED_TYPES = {0x05, 0x0F, 0x85}


def clip_runs(runs: list[ex.Run], start: int, size: int) -> list[ex.Run]:
    """The runs of ``[start, start + size)``, shifted to start at 0."""
    out: list[ex.Run] = []
    end = start + size
    for r in runs:
        lo, hi = max(r.start, start), min(r.start + r.length, end)
        if lo < hi:
            ex.add_run(out, lo - start, hi - lo, r.flags)
    return out


class PartitionView(ChainView):
    """Partition ``number`` of ``chain``: ``size`` bytes from ``start``.

    ptype: the GPT type GUID (lowercase) or the MBR type as ``0xNN``.
    """

    kind = "partition"
    has_qcow2 = False  # the chain view's .qcow2 holds the whole disk

    def __init__(self, chain: ChainView, number: int, start: int, size: int, ptype: str):
        super().__init__(chain.disk, f"p{number}", chain.layer, chain.spec, size)
        self.folder = f"partitions/{chain.basename}"
        self.chain = chain
        self.number = number
        self.offset = start
        self.ptype = ptype
        self.mutable = chain.mutable

    @property
    def export_size(self) -> int:
        return self.chain.size

    @property
    def export_map(self):
        return self.chain.map

    async def read_runs(self, status):
        runs = await status.runs(self.spec, self.chain.size)
        if self.chain.map is None and self.chain.problem is None:
            self.chain.set_map(runs)  # reads go through the chain view's chunks
        return {ctx: clip_runs(r, self.offset, self.size) for ctx, r in runs.items()}

    def build_map(self, runs):
        # As the chain view builds its own (a running domain's backup export
        # has no allocation depth), over the partition's runs and size.
        return type(self.chain).build_map(self, runs)

    def xattrs(self) -> dict[str, str]:
        x = super().xattrs()
        x["user.snapfs.view"] = "partition"
        x["user.snapfs.partition.number"] = str(self.number)
        x["user.snapfs.partition.start"] = str(self.offset)
        x["user.snapfs.partition.type"] = self.ptype
        return x
