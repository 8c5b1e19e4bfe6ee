"""Tier 1: libvirt mode's pure rules: XML parsing, which bitmaps can be trusted, unions."""

import xml.etree.ElementTree as ET

from snapfs import extents as ex
from snapfs.formats import Layer
from snapfs.formats.qcow2 import BITMAP_AUTO, BITMAP_IN_USE, Bitmap
from snapfs.sources.bitmaps import backing_verdict, bitmap_verdict
from snapfs.sources.libvirt_xml import (
    DiskDef,
    backup_xml,
    checkpoint_xml,
    parse_checkpoint,
    parse_disks,
    parse_snapshot,
)


def layer(path, *bitmaps):
    """bitmaps: names, or (name, flags)."""
    bms = [Bitmap(b, BITMAP_AUTO, 65536) if isinstance(b, str) else Bitmap(b[0], b[1], 65536)
           for b in bitmaps]
    return Layer(path=path, format="qcow2", size=1 << 20, bitmaps=bms)


def test_bitmap_union_over_the_layers_that_hold_it():
    chain = [layer("/i/base", "ck0"), layer("/i/s1", "ck0", "ck1"), layer("/i/s2", "ck0", "ck1")]
    holding, why = bitmap_verdict(chain, "ck1", "/i/s1")
    assert why is None and [lay.path for lay in holding] == ["/i/s2", "/i/s1"]
    holding, why = bitmap_verdict(chain, "ck0", "/i/base")
    assert why is None and [lay.path for lay in holding] == ["/i/s2", "/i/s1", "/i/base"]
    # Without the checkpoint's own record of its image, libvirt's rules alone.
    assert bitmap_verdict(chain, "ck1", None)[1] is None


def test_bitmap_verdicts_that_force_a_full_copy():
    def why(chain, bitmap="ck1", then="/i/base"):
        holding, reason = bitmap_verdict(chain, bitmap, then)
        assert holding == []
        return reason

    assert "missing from the top image /i/s1" in why([layer("/i/base", "ck1"), layer("/i/s1")])
    assert "has a gap" in why([layer("/i/base", "ck1"), layer("/i/s1"), layer("/i/s2", "ck1")])
    assert "marked in use" in why([layer("/i/base", ("ck1", BITMAP_AUTO | BITMAP_IN_USE)),
                                   layer("/i/s1", "ck1")])
    assert "disabled" in why([layer("/i/base", ("ck1", 0))])
    # Image mode serves a bitmap a user disabled as it is.
    assert bitmap_verdict([layer("/i/base", ("ck1", 0))], "ck1", require_enabled=False)[1] is None
    # The image active at checkpoint time lost its copy: changes made there are lost.
    assert "missing from /i/base, the image that was active" in why(
        [layer("/i/base"), layer("/i/s1", "ck1")])
    # A chain that no longer contains that image (a revert, a commit).
    assert "no longer in the disk's chain" in why([layer("/i/other", "ck1")])


def test_backing_verdict_for_running_domains():
    chain = [layer("/i/base", "ck1"), layer("/i/s1", "ck1"), layer("/i/top")]
    assert backing_verdict(chain, "ck1", "/i/base") is None
    assert backing_verdict(chain, "ck1", "/i/top") is None  # libvirt checks the active layer
    assert backing_verdict(chain, "ck1", None) is None
    chain[1] = layer("/i/s1")
    assert "missing from /i/s1" in backing_verdict(chain, "ck1", "/i/base")
    assert "no longer in the disk's chain" in backing_verdict(chain, "ck1", "/i/gone")


def test_union_of_bitmap_copies():
    size = 100
    a = [(0, 10, 1), (10, 90, 0)]
    b = [(0, 50, 0), (50, 10, 1), (60, 40, 0)]
    c = [(0, 5, 1), (5, 95, 0)]
    assert ex.union_runs(size, a, b, c) == [(0, 10, 1), (10, 40, 0), (50, 10, 1), (60, 40, 0)]
    assert ex.union_runs(size, a) == a


def test_parse_libvirt_xml():
    cp = parse_checkpoint("""<domaincheckpoint><name>ck2</name><creationTime>1700000002</creationTime>
      <disks><disk name='vda' checkpoint='bitmap' bitmap='ck2'/><disk name='vdb' checkpoint='no'/>
        <disk name='vdc' checkpoint='bitmap'/></disks>
      <domain type='kvm'><devices>
        <disk type='file' device='disk'><driver type='qcow2'/><source file='/i/a.qcow2'/><target dev='vda'/></disk>
      </devices></domain></domaincheckpoint>""")
    assert (cp.name, cp.created) == ("ck2", 1700000002)
    assert cp.disks == {"vda": "ck2", "vdb": None, "vdc": "ck2"}
    assert cp.sources == {"vda": "/i/a.qcow2"}

    snap = parse_snapshot("""<domainsnapshot><name>s1</name><creationTime>5</creationTime><disks>
      <disk name='vda' snapshot='external' type='file'><source file='/i/a.s1'/></disk>
      <disk name='vdb' snapshot='no'/></disks>
      <domain><devices><disk type='file' device='disk'><driver type='qcow2'/>
        <source file='/i/a.qcow2'/><target dev='vda'/></disk></devices></domain></domainsnapshot>""")
    assert snap.disks == {"vda": ("external", "/i/a.s1"), "vdb": ("no", None)}
    assert snap.sources == {"vda": ("/i/a.qcow2", "qcow2")}

    disks = parse_disks(ET.fromstring("""<domain><devices>
      <disk type='block' device='disk'><driver type='raw'/><source dev='/dev/vg/lv'/><target dev='sda'/></disk>
      <disk type='file' device='cdrom'><driver type='raw'/><target dev='hdc'/><readonly/></disk>
      <disk type='network' device='disk'><driver type='raw'/><source protocol='nbd' name='x'/><target dev='vdz'/></disk>
      <disk type='file' device='disk'><driver type='vmdk'/><source file='/i/x.vmdk'/><target dev='vdy'/></disk>
      <disk type='file' device='disk'><driver type='qcow2'/><target dev='vdx'/></disk>
    </devices></domain>"""))
    why = {d.target: d.unsupported() for d in disks}
    assert why["sda"] is None and disks[0].source == "/dev/vg/lv"
    assert why["hdc"] == "a cdrom device, not a disk"
    assert why["vdz"].startswith("a network disk")
    assert why["vdy"].startswith("format vmdk")
    assert why["vdx"] == "the disk has no source (empty)"


def test_backup_and_checkpoint_xml_carry_any_name():
    odd = "ck <1> & 'two' \"three\" é"
    disks = [DiskDef(target="vda", format="qcow2", source="/i/a b.qcow2"),
             DiskDef(target="vdb", format="raw", source="/i/b.raw")]
    modes = {"vda": ("incremental", None), "vdb": ("full", "raw")}
    root = ET.fromstring(backup_xml("/run/x y/nbd.sock", disks, modes, odd, ["hdc"],
                                    {"vda": "/s/v&a.scratch", "vdb": "/s/vdb.scratch"}))
    assert (root.tag, root.get("mode")) == ("domainbackup", "pull")
    assert root.find("server").attrib == {"transport": "unix", "socket": "/run/x y/nbd.sock"}
    got = {d.get("name"): d.attrib for d in root.findall("./disks/disk")}
    assert got == {
        "vda": {"name": "vda", "backup": "yes", "type": "file", "backupmode": "incremental",
                "incremental": odd},
        "vdb": {"name": "vdb", "backup": "yes", "type": "file", "backupmode": "full"},
        "hdc": {"name": "hdc", "backup": "no"},
    }
    assert root.find("./disks/disk[@name='vda']/scratch").get("file") == "/s/v&a.scratch"

    cp = ET.fromstring(checkpoint_xml(odd, disks, ["hdc"]))
    assert cp.findtext("name") == odd
    assert {d.get("name"): d.get("checkpoint") for d in cp.findall("./disks/disk")} == {
        "vda": "bitmap", "vdb": "no", "hdc": "no"}
    assert checkpoint_xml(None, disks, []) is None
