"""What libvirt's XML says: domains' disks, checkpoints, snapshots.

Parsed with ElementTree into small records; pure (no libvirt connection, no
pyfuse3, no libnbd), so the rules built on them are tested without libvirt.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from ..formats import FORMATS


@dataclass
class DiskDef:
    """One ``<disk>`` of a domain definition."""

    target: str
    device: str = "disk"
    type: str = "file"
    format: str | None = None
    source: str | None = None

    def unsupported(self) -> str | None:
        """Why snapfs does not serve this disk, or None."""
        if self.device != "disk":
            return f"a {self.device} device, not a disk"
        if self.type not in ("file", "block"):
            return f"a {self.type} disk: snapfs serves disks backed by a file or block device"
        if not self.source:
            return "the disk has no source (empty)"
        if self.format not in FORMATS:
            return f"format {self.format or 'not given'}: snapfs serves qcow2 and raw disks"
        return None


def parse_disks(domain: ET.Element) -> list[DiskDef]:
    disks = []
    for d in domain.findall("./devices/disk"):
        target = d.find("target")
        if target is None or not target.get("dev"):
            continue
        driver = d.find("driver")
        source = d.find("source")
        dtype = d.get("type", "file")
        src = None
        if source is not None:
            src = source.get("file") if dtype == "file" else source.get("dev") if dtype == "block" else None
        disks.append(DiskDef(target=target.get("dev"), device=d.get("device", "disk"), type=dtype,
                             format=driver.get("type") if driver is not None else None, source=src))
    return disks


@dataclass
class CheckpointDef:
    """A libvirt checkpoint.

    disks: target -> bitmap name, or None for ``checkpoint='no'``; a disk
    the checkpoint does not list was attached after it.
    sources: target -> the image that was active when it was made.
    """

    name: str
    created: int = 0
    disks: dict[str, str | None] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)


@dataclass
class SnapshotDef:
    """A libvirt snapshot.

    disks: target -> (``external``/``internal``/``no``, the overlay made).
    sources: target -> (image active when it was taken, its format).
    """

    name: str
    created: int = 0
    disks: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    sources: dict[str, tuple[str, str | None]] = field(default_factory=dict)


def _sources(root: ET.Element) -> dict[str, tuple[str, str | None]]:
    dom = root.find("domain")
    if dom is None:
        return {}
    return {d.target: (d.source, d.format) for d in parse_disks(dom) if d.source}


def parse_checkpoint(xml: str) -> CheckpointDef:
    root = ET.fromstring(xml)
    cp = CheckpointDef(name=root.findtext("name"), created=int(root.findtext("creationTime") or 0))
    for d in root.findall("./disks/disk"):
        tracked = d.get("checkpoint", "bitmap") == "bitmap"
        cp.disks[d.get("name")] = (d.get("bitmap") or cp.name) if tracked else None
    cp.sources = {t: s for t, (s, _) in _sources(root).items()}
    return cp


def parse_snapshot(xml: str) -> SnapshotDef:
    root = ET.fromstring(xml)
    snap = SnapshotDef(name=root.findtext("name"), created=int(root.findtext("creationTime") or 0))
    for d in root.findall("./disks/disk"):
        src = d.find("source")
        snap.disks[d.get("name")] = (d.get("snapshot", "no"), src.get("file") if src is not None else None)
    snap.sources = _sources(root)
    return snap


# -- what snapfs asks libvirt for -----------------------------------------------


def backup_xml(socket: str, disks, modes: dict[str, tuple[str, str | None]], since: str | None,
               others, scratch: dict[str, str]) -> str:
    """A pull-mode ``<domainbackup>`` over a UNIX socket.

    disks: the served DiskDefs, each ``incremental`` from checkpoint
    ``since`` or ``full`` (``modes``: target -> (mode, reason)), with its
    scratch file; others: targets left out (``backup='no'``).
    """
    root = ET.Element("domainbackup", mode="pull")
    ET.SubElement(root, "server", transport="unix", socket=socket)
    elems = ET.SubElement(root, "disks")
    for d in disks:
        mode, _ = modes[d.target]
        disk = ET.SubElement(elems, "disk", name=d.target, backup="yes", type="file", backupmode=mode)
        if mode == "incremental":
            disk.set("incremental", since)
        ET.SubElement(disk, "scratch", file=scratch[d.target])
    for t in others:
        ET.SubElement(elems, "disk", name=t, backup="no")
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str | None, disks, others) -> str | None:
    """A ``<domaincheckpoint>`` with a bitmap in every served qcow2 disk, none elsewhere."""
    if not name:
        return None
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    elems = ET.SubElement(root, "disks")
    for d in disks:
        ET.SubElement(elems, "disk", name=d.target, checkpoint="bitmap" if d.format == "qcow2" else "no")
    for t in others:
        ET.SubElement(elems, "disk", name=t, checkpoint="no")
    return ET.tostring(root, encoding="unicode")
