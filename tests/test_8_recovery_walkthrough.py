"""Tier 8: docs/recovery.md's walk-through, run as written, on real VMs.

A VM runs from a point of a backup repository (and from a libvirt domain's
snapshot) behind a local overlay, reads and writes it, moves home with
``virsh blockcopy --pivot`` while it runs, and the mount goes. The shell
blocks are the document's own. The VMs have no OS: the backed-up disk's boot
sector reads the disk in a loop through the BIOS (virtio-blk requests, to
which the disk's error policy applies, as to an OS's), and the checks read
every pattern of the point through the VM's own disk (qemu-io in the VM,
over HMP). The copy must equal the point plus what the guest wrote
(``qemu-img compare``) and be clean (``qemu-img check``).

Step 3 (``snapfs umount`` refuses while the VM runs from the mount, names the
view and qemu, and the VM reads on; ``--force`` unmounts and the VM pauses)
and step 6 (snapfs killed under the VM: it pauses with an I/O error; ``virsh
resume`` after a remount pauses it again, and a reopen by path fails; it
starts over, or goes on through a descriptor handed to qemu) are checked on
the same kind of VM.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import time
import xml.etree.ElementTree as ET

import libvirt
import libvirt_qemu
from conftest import LOG_RECORD, REPO, MiB, create, qemu_img, qemu_io, run, walkthrough
from libvirt_env import NAME_PREFIX, DiskSpec, TestDomain, domain_xml

from snapfs.runtime import find_mount, pid_alive

DOC = os.path.join(REPO, "docs", "recovery.md")
SNAPFS = os.path.join(REPO, ".venv", "bin", "snapfs")
SIZE = 64 * MiB
K = 1024
BLOCK = 4 * K

# The boot sector of the backed-up disks: a "guest OS" that reads its disk.
# It reads sector 0 with int 13h (SeaBIOS sends a virtio-blk request), halts
# until the next timer tick, and again: about 18 reads a second, each of an
# area the overlay does not hold.
BOOT_CODE = bytes.fromhex(
    "fa"        # cli
    "31c0"      # xor ax, ax
    "8ed8"      # mov ds, ax
    "8ec0"      # mov es, ax
    "8ed0"      # mov ss, ax
    "bc007c"    # mov sp, 0x7c00
    "89d6"      # mov si, dx          ; dl: the BIOS's number of this disk
    "fb"        # sti
    "b80102"    # again: mov ax, 0x0201  ; read 1 sector
    "b90100"    # mov cx, 0x0001      ; cylinder 0, sector 1
    "89f2"      # mov dx, si
    "30f6"      # xor dh, dh          ; head 0
    "bb007e"    # mov bx, 0x7e00      ; to 0:7e00
    "cd13"      # int 0x13
    "f4"        # hlt                 ; until the next timer tick
    "ebee"      # jmp again
)
BOOT_SECTOR = BOOT_CODE.ljust(510, b"\0") + b"\x55\xaa"

# The backup repository: (pattern, start, length) written into each file, in
# order; pattern 0 is a write of zeros (over the base's data, in inc1).
BACKUPS = {
    "base": [(0x11, 1 * MiB, 7 * MiB), (0x12, 16 * MiB, 4 * MiB)],
    "inc1": [(0x21, 4 * MiB, 4 * MiB), (0, 16 * MiB, 1 * MiB)],
    "inc2": [(0x31, 6 * MiB, 1 * MiB), (0x32, 32 * MiB, 2 * MiB)],
}
POINT = BACKUPS["base"] + BACKUPS["inc1"] + BACKUPS["inc2"]  # the disk at inc2

# What the guest writes: where the backup has nothing, over its data (a whole
# cluster), and 4 KiB of a cluster (qemu copies the rest from the backup).
WRITES = [(0x41, 40 * MiB, 1 * MiB), (0x42, 17 * MiB, 64 * K), (0x43, 4 * MiB + 4 * K, 4 * K)]

RUNNING = (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_BOOTED)
PAUSED_IOERROR = (libvirt.VIR_DOMAIN_PAUSED, libvirt.VIR_DOMAIN_PAUSED_IOERROR)


# -- the walk-through's shell ------------------------------------------------------

class Shell:
    """Runs blocks of the document with ``bash -euo pipefail`` and its variables.

    ``MNT`` and ``VMDIR`` are made in ``d``, a directory qemu's user can reach
    (the checkout and pytest's tmp_path may be 0700)."""

    def __init__(self, d, prelude="", **variables):
        self.mnt = os.path.join(d, "mnt")
        self.vmdir = os.path.join(d, "vm")
        os.makedirs(self.mnt)
        os.makedirs(self.vmdir)
        os.chmod(self.vmdir, 0o711)
        self.env = dict(os.environ, MNT=self.mnt, VMDIR=self.vmdir,
                        PATH=os.path.join(REPO, ".venv", "bin") + ":" + os.environ["PATH"],
                        **{k: str(v) for k, v in variables.items()})
        self.prelude = prelude
        self.logs = set()

    def __call__(self, block, prelude=""):
        script = "\n".join([self.prelude, prelude, block])
        r = run("bash", "-euo", "pipefail", "-c", script, env=self.env, check=False)
        assert r.returncode == 0, f"block failed ({r.returncode}):\n{script}\n{r.stdout}{r.stderr}"
        self.logs.update(re.findall(r"^snapfs: mounted .* \(log: (.*)\)$", r.stdout, re.M))
        return r.stdout

    def mount(self, *source, allow_other=True):
        """A mount made by the test itself, as the document makes it."""
        out = run(SNAPFS, "mount", *source, self.mnt, *(["--allow-other"] if allow_other else [])).stdout
        self.logs.update(re.findall(r"\(log: (.*)\)$", out, re.M))

    def umount(self, *opts):
        return run(SNAPFS, "umount", *opts, self.mnt, check=False)

    def close(self):
        """Unmount whatever is left, and check the logs of every mount made."""
        if os.path.ismount(self.mnt):
            self.umount("--force")
        for path in self.logs:
            with open(path, errors="replace") as f:
                bad = [line for line in f if "Traceback" in line or (
                    (m := LOG_RECORD.match(line)) and m["level"] in ("WARNING", "ERROR", "CRITICAL")
                    and m["logger"] != "snapfs.report")]
            os.unlink(path)
            assert not bad, f"{path}:\n" + "".join(bad)


# -- disks and domains ---------------------------------------------------------

def paint(path, runs, fmt="qcow2"):
    """Write ``runs`` into an image with qemu-io (pattern 0: zeros)."""
    qemu_io(path, *(f"write -z {s} {n}" if p == 0 else f"write -P {p:#x} {s} {n}" for p, s, n in runs),
            fmt=fmt)


def boot_disk(d, path, backing=None):
    """A qcow2 whose sector 0 is BOOT_SECTOR (or, with ``backing``, an overlay)."""
    if backing:
        return create(path, backing=backing)
    create(path, SIZE)
    boot = os.path.join(d, "boot.bin")
    with open(boot, "wb") as f:
        f.write(BOOT_SECTOR)
    qemu_io(path, f"write -s {boot} 0 512")
    return path


def build_backups(d):
    """``d/backups/web1/``: base.qcow2 <- inc1.qcow2 <- inc2.qcow2, readable by qemu's user."""
    web1 = os.path.join(d, "backups", "web1")
    os.makedirs(web1)
    lower = None
    for name, runs in BACKUPS.items():
        path = boot_disk(d, os.path.join(web1, f"{name}.qcow2"), lower)
        paint(path, runs)
        os.chmod(path, 0o644)
        lower = f"{name}.qcow2"
    for p in (web1, os.path.dirname(web1)):
        os.chmod(p, 0o755)
    return os.path.dirname(web1)


def as_raw(image, dest, *runs):
    """The disk of ``image`` as a raw file, with ``runs`` written over it."""
    qemu_img("convert", "-U", "-O", "raw", image, dest)
    paint(dest, runs, fmt="raw")
    return dest


def layout(*runs):
    """[(pattern, start, length)] the disk reads after ``runs`` painted over zeros,
    in 4 KiB blocks; the block of sector 0 (the boot sector) left out."""
    blocks = [0] * (SIZE // BLOCK)
    for p, s, n in runs:
        blocks[s // BLOCK:(s + n) // BLOCK] = [p] * (n // BLOCK)
    out = []
    for i, p in enumerate(blocks[1:], 1):
        if out and out[-1][0] == p:
            out[-1][2] += BLOCK
        else:
            out.append([p, i * BLOCK, BLOCK])
    return [tuple(r) for r in out]


def recovery_domain(conn, name):
    """The document's ``$DOM``: a defined domain without a disk."""
    full = f"{NAME_PREFIX}{name}-{secrets.token_hex(3)}"
    return TestDomain(conn, conn.defineXML(domain_xml(full, [], uri=conn.getURI())), [])


def vm_reads(dom, runs):
    """The VM reads exactly ``runs`` on its disk (qemu-io on its device)."""
    for p, s, n in runs:
        out = dom.qemu_io("vda", f"read -P {p:#x} {s} {n}")
        assert out.splitlines()[:1] == [f"read {n}/{n} bytes at offset {s}"], (hex(p), s, n, out)


def guest_writes(dom, runs):
    for p, s, n in runs:
        dom.write("vda", s, n, p)
    dom.flush("vda")


def wait_for(what, check, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.02)
    return value


def guest_reads(dom):
    """How many reads the guest made of its disk (virtio-blk requests)."""
    return int(re.search(r"rd_operations=(\d+)", dom.hmp("info blockstats"))[1])


def wait_guest_reading(dom, more=5):
    """The guest reads its disk on (``more`` reads from now), and runs."""
    start = guest_reads(dom)
    wait_for("the guest reads its disk", lambda: guest_reads(dom) >= start + more)
    assert tuple(dom.dom.state()) in (RUNNING, (libvirt.VIR_DOMAIN_RUNNING, libvirt.VIR_DOMAIN_RUNNING_UNPAUSED))


def state(dom):
    return tuple(dom.dom.state())


def qemu_pid(dom):
    with open(f"/run/libvirt/qemu/{dom.name}.pid") as f:
        return int(f.read())


def qemu_files_under(dom, path):
    """The files under ``path`` that the domain's qemu holds open."""
    fds = f"/proc/{qemu_pid(dom)}/fd"
    out = []
    for fd in os.listdir(fds):
        try:
            target = os.readlink(os.path.join(fds, fd))
        except FileNotFoundError:
            continue
        if target.startswith(path + "/"):
            out.append(target)
    return out


def kill_snapfs(mnt):
    pid = find_mount(mnt)[1]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for("snapfs exits", lambda: not pid_alive(pid))


def persistent_source(dom):
    xml = ET.fromstring(dom.dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    disk = next(x for x in xml.iterfind("devices/disk") if x.find("target").get("dev") == "vda")
    return disk.find("source").get("file")


def assert_identical(a, b, fa="qcow2", fb="raw"):
    r = run("qemu-img", "compare", "-U", "-f", fa, "-F", fb, a, b, check=False)
    assert r.returncode == 0, f"{a} != {b}: {r.stdout}{r.stderr}"


def assert_copy(final, expected):
    """A clean standalone qcow2 that reads as ``expected`` (the domain is shut off)."""
    r = run("qemu-img", "check", "--output=json", final, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report
    info = json.loads(qemu_img("info", "--output=json", final).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info, info
    assert_identical(final, expected)


def on_its_copy(dom, final, written, expected):
    """After the pivot: the VM runs on ``final`` and reads ``written``; shut off,
    ``final`` is a clean standalone qcow2 equal to ``expected``."""
    assert dom.source("vda") == (final, "qcow2")
    wait_guest_reading(dom)
    vm_reads(dom, written)
    dom.destroy()
    assert_copy(final, expected)


# -- steps 1 to 4: a backup repository --------------------------------------------------

def test_a_vm_runs_from_a_backup_and_moves_home(conn, d):
    steps = walkthrough(DOC)
    assert sorted(steps) == ["1", "2", "3", "4", "5", "6"], steps.keys()
    assert steps["3"] == []  # the refusal is shown, not run: checked here
    (mount_blk,), (start_blk,), (home_blk,) = steps["1"], steps["2"], steps["4"]
    images = build_backups(d)
    truth = as_raw(f"{images}/web1/inc2.qcow2", f"{d}/truth.raw")
    with recovery_domain(conn, "rec") as dom:
        sh = Shell(d, IMAGES=images, DOM=dom.name)
        try:
            out = sh(mount_blk)
            assert out.split()[-9:] == [f"{n}{e}" for n in ("00-base", "01-inc1", "02-inc2")
                                        for e in (".map.json", ".qcow2", ".raw")], out
            sh(start_blk)
            overlay, view = f"{sh.vmdir}/web1-overlay.qcow2", f"{sh.mnt}/web1/inc2.qcow2/chain/02-inc2.qcow2"
            assert state(dom) == RUNNING
            assert dom.source("vda") == (overlay, "qcow2")
            info = json.loads(qemu_img("info", "-U", "--output=json", overlay).stdout)
            assert (info["backing-filename"], info["backing-filename-format"]) == (view, "qcow2")
            assert_identical(overlay, truth)

            # 2. The VM boots from the backup, reads the point, and writes.
            wait_guest_reading(dom)
            vm_reads(dom, layout(*POINT))
            guest_writes(dom, WRITES)
            written = layout(*POINT, *WRITES)
            vm_reads(dom, written)

            # 3. snapfs umount refuses, names the view and qemu, and the mount keeps working.
            r = sh.umount()
            assert r.returncode == 1, r.stdout + r.stderr
            assert (f"web1/inc2.qcow2/chain/02-inc2.qcow2: opened by qemu-system-x86 (pid {qemu_pid(dom)})"
                    in r.stderr), r.stderr
            assert "snapfs umount --force" in r.stderr, r.stderr
            assert os.path.ismount(sh.mnt)
            wait_guest_reading(dom)
            vm_reads(dom, written)

            # A copy job shows with virsh blockjob --info, and --abort leaves the VM on the overlay.
            run("virsh", "blockcopy", dom.name, "vda", f"{sh.vmdir}/aborted.qcow2", "--transient-job")
            progress = run("virsh", "blockjob", dom.name, "vda", "--info").stderr  # virsh prints it there
            assert progress.strip().startswith("Block Copy: ["), progress
            run("virsh", "blockjob", dom.name, "vda", "--abort")
            assert run("virsh", "blockjob", dom.name, "vda", "--info").stdout.strip() == \
                "No current block job for vda"
            assert dom.source("vda") == (overlay, "qcow2")

            # 4. Home: the VM runs on from the copy, and the mount goes.
            out = sh(home_blk)
            assert "Successfully pivoted" in out and "No current block job for vda" in out, out
            final = f"{sh.vmdir}/web1.qcow2"
            assert overlay in out and out.index(overlay) < out.index(final), out  # domblklist before, after
            assert not os.path.ismount(sh.mnt) and not os.path.exists(overlay)
            assert persistent_source(dom) == final  # libvirt wrote the pivot into the definition
            on_its_copy(dom, final, written, as_raw(truth, f"{d}/expected.raw", *WRITES))
        finally:
            sh.close()


def test_the_check_of_step_1_fails_without_allow_other(d):
    """Step 1's last line tells, before any VM starts, that qemu's user cannot read the point."""
    (mount_blk,) = walkthrough(DOC)["1"]
    check = mount_blk.strip().splitlines()[-1]
    assert check.startswith("runuser -u libvirt-qemu -- "), check
    sh = Shell(d, IMAGES=build_backups(d))
    try:
        sh.mount("--images", sh.env["IMAGES"], allow_other=False)
        r = run("bash", "-euo", "pipefail", "-c", check, env=sh.env, check=False)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r.stdout + r.stderr
        sh(check.replace("runuser -u libvirt-qemu -- ", ""))  # the mounting user reads it
    finally:
        sh.close()


# -- step 5: a libvirt domain's snapshot ------------------------------------------------

def test_a_vm_runs_from_a_libvirt_snapshot(conn, d):
    start_blk, home_blk = walkthrough(DOC)["5"]
    image = boot_disk(d, f"{d}/source.qcow2")
    with TestDomain.define(conn, "src", [DiskSpec("vda", image)]) as source, \
            recovery_domain(conn, "clone") as clone:
        sh = Shell(d, SOURCE=source.name, CLONE=clone.name)
        try:
            source.start()
            guest_writes(source, POINT)
            s1 = source.record("vda", f"{d}/s1.raw")
            source.snapshot_external("s1", {"vda": f"{d}/source.s1"})
            after = [(0x55, 1 * MiB, 1 * MiB), (0x56, 48 * MiB, 1 * MiB)]  # not in s1
            guest_writes(source, after)

            sh(start_blk)
            assert state(clone) == RUNNING
            wait_guest_reading(clone)
            vm_reads(clone, layout(*POINT))  # s1, not what the source wrote since
            guest_writes(clone, WRITES)
            vm_reads(clone, layout(*POINT, *WRITES))

            out = sh(home_blk)
            assert "Successfully pivoted" in out, out
            assert not os.path.ismount(sh.mnt)
            final = f"{sh.vmdir}/clone.qcow2"
            assert clone.source("vda") == (final, "qcow2")
            wait_guest_reading(clone)
            vm_reads(clone, layout(*POINT, *WRITES))
            vm_reads(source, layout(*POINT, *after))  # the source ran on, untouched
            clone.destroy()
            assert_copy(final, as_raw(s1, f"{d}/expected.raw", *WRITES))
        finally:
            sh.close()


# -- step 6: snapfs killed under the VM -------------------------------------------------

def running_from_the_backup(sh, dom):
    """Steps 1 and 2; the guest reads and has written WRITES (flushed)."""
    steps = walkthrough(DOC)
    sh(steps["1"][0])
    sh(steps["2"][0])
    wait_guest_reading(dom)
    guest_writes(dom, WRITES)


def killed_under_the_vm(sh, dom):
    """snapfs is killed: the VM pauses at its next read, as the document says."""
    kill_snapfs(sh.mnt)
    wait_for("the VM pauses with an I/O error", lambda: state(dom) == PAUSED_IOERROR, timeout=30)
    assert run("virsh", "domstate", dom.name, "--reason").stdout.strip() == "paused (I/O error)"
    assert run("virsh", "domblkerror", dom.name).stdout.strip() == "vda: unspecified error"


def test_umount_force_under_the_vm_pauses_it(conn, d):
    """Step 3: ``snapfs umount --force`` unmounts, says what breaks, and the VM
    pauses at its next read of the backup, as when snapfs dies."""
    images = build_backups(d)
    with recovery_domain(conn, "force") as dom:
        sh = Shell(d, IMAGES=images, DOM=dom.name)
        try:
            running_from_the_backup(sh, dom)
            r = sh.umount("--force")
            assert r.returncode == 0, r.stdout + r.stderr
            assert (f"web1/inc2.qcow2/chain/02-inc2.qcow2: opened by qemu-system-x86 (pid {qemu_pid(dom)})"
                    in r.stderr), r.stderr
            assert not os.path.ismount(sh.mnt)
            wait_for("the VM pauses with an I/O error", lambda: state(dom) == PAUSED_IOERROR, timeout=30)
            dom.destroy()
        finally:
            sh.close()


def test_snapfs_killed_under_the_vm_start_over(conn, d):
    start_over = walkthrough(DOC)["6"][0]
    home_blk = walkthrough(DOC)["4"][0]
    images = build_backups(d)
    truth = as_raw(f"{images}/web1/inc2.qcow2", f"{d}/truth.raw")
    with recovery_domain(conn, "over") as dom:
        sh = Shell(d, IMAGES=images, DOM=dom.name)
        try:
            running_from_the_backup(sh, dom)
            killed_under_the_vm(sh, dom)
            sh(start_over)  # its snapfs umount cleans up after the killed mount
            assert state(dom) == RUNNING
            wait_guest_reading(dom)
            written = layout(*POINT, *WRITES)
            vm_reads(dom, written)  # the overlay kept what the guest wrote and flushed
            sh(home_blk)
            dom.destroy()
            assert_copy(f"{sh.vmdir}/web1.qcow2", as_raw(truth, f"{d}/expected.raw", *WRITES))
        finally:
            sh.close()


def blockdev_options(dom, node):
    """The options libvirt gave ``node`` when it started qemu (its -blockdev)."""
    with open(dom.log_path) as f:
        nodes = [json.loads(n) for n in re.findall(r"-blockdev '(\{.*?\})'", f.read())]
    return [n for n in nodes if n["node-name"] == node][-1]


def libvirt_qmp(dom, command):
    """qemu's answer to a QMP command, through libvirt."""
    return libvirt_qemu.qemuMonitorCommand(dom.dom, json.dumps(command), 0)


def test_snapfs_killed_under_the_vm_go_on(conn, d):
    helpers, go_on, finish = walkthrough(DOC)["6"][1:]
    images = build_backups(d)
    truth = as_raw(f"{images}/web1/inc2.qcow2", f"{d}/truth.raw")
    with recovery_domain(conn, "on") as dom:
        sh = Shell(d, IMAGES=images, DOM=dom.name)
        view = f"{sh.mnt}/web1/inc2.qcow2/chain/02-inc2.qcow2"
        try:
            running_from_the_backup(sh, dom)
            killed_under_the_vm(sh, dom)

            # A new mount at the same path serves the view, but not to qemu:
            # virsh resume pauses the VM again, and a reopen by path fails.
            assert sh.umount().returncode == 0  # a dead mount: detached without --force
            sh.mount("--images", images)
            assert_identical(view, truth)
            dom.dom.resume()
            wait_for("the resumed VM pauses again", lambda: state(dom) == PAUSED_IOERROR, timeout=30)
            assert "Transport endpoint is not connected" in dom.qemu_io("vda", "read 1M 4k")
            storage = blockdev_options(dom, "libvirt-2-storage")
            assert storage["filename"] == view, storage
            answer = json.loads(libvirt_qmp(dom, {"execute": "blockdev-reopen", "arguments": {
                "options": [dict(storage, cache={"direct": True})]}}))
            assert "Transport endpoint is not connected" in answer["error"]["desc"], answer

            # Go on: a descriptor of the new mount under the overlay.
            sh(go_on, prelude=helpers)
            wait_guest_reading(dom, more=20)  # and it does not pause again
            written = layout(*POINT, *WRITES)
            vm_reads(dom, written)

            out = sh(finish, prelude=helpers)
            assert "Successfully pivoted" in out, out
            assert not os.path.ismount(sh.mnt)
            final = f"{sh.vmdir}/web1.qcow2"
            assert qemu_files_under(dom, sh.mnt) == []
            on_its_copy(dom, final, written, as_raw(truth, f"{d}/expected.raw", *WRITES))
        finally:
            sh.close()

