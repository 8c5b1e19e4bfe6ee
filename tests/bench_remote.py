"""Remote image directories (docs/remote.md): throughput and scale over ssh.

Run as ``.venv/bin/python tests/bench_remote.py`` (part of ``make bench``); a
report, not a pytest test. A test host (``remote_env.TestHost``: its own
sshd, images in a mount namespace) serves the images; a user-space relay
adds latency (``latency_relay.Relay``; this kernel has no netem). Each
figure is the median of ``--reps`` runs, taken side by side in one run:

``copy``
    A 1 GiB qcow2 disk holding 512 MiB of data. ``cp --sparse=always`` and
    ``qemu-img convert -O raw`` of its chain view from a remote mount, against
    the same from a local mount of a copy of the image (target: at most 1.3x
    the local time). With ``--delay`` (default 25 ms) added each way: cp of
    the remote view, against ``nbdcopy`` of the same image from a qemu-nbd on
    the host whose socket is forwarded through one ssh master connection over
    the same relay, as snapfs reaches it (target: cp at least 0.7x nbdcopy's
    throughput).

``scale``
    100 disks of 5 layers each on the host, reached with ``--delay`` added:
    ``snapfs mount`` until it returns, then the first ``ls -lR`` (target: both
    within 30 s).

Outputs go to /dev/shm (memory), so the local disk does not time the copies.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from remote_env import ALIAS, TestHost  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNAPFS = [sys.executable, "-m", "snapfs"]
MiB = 1 << 20


def log(msg: str) -> None:
    print(msg, flush=True)


def run(cmd, **kw) -> subprocess.CompletedProcess:
    kw.setdefault("check", True)
    kw.setdefault("capture_output", True)
    return subprocess.run([str(c) for c in cmd], **kw)


def timed(cmd, **kw) -> float:
    t = time.monotonic()
    run(cmd, **kw)
    return time.monotonic() - t


def cpu_of(pids) -> float:
    """CPU seconds (user + system) the processes have used so far, their
    reaped children included."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in fields[11:15])
        except OSError:
            pass
    return total / tick


def drop_caches() -> None:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


class Bench:
    def __init__(self, base: str, reps: int, delay: float):
        self.base, self.reps, self.delay = base, reps, delay
        self.host = TestHost.start(os.path.join(base, "host"))
        self.slow = self.host.slow_alias(delay)
        self.out = tempfile.mkdtemp(prefix="snapfs-bench-remote-", dir="/dev/shm")
        self.mounts: list[str] = []

    def mount(self, source: list, name: str) -> str:
        mnt = os.path.join(self.base, name)
        os.makedirs(mnt, exist_ok=True)
        run([*SNAPFS, "mount", *source, "--ssh-config", self.host.config, mnt], cwd=REPO)
        self.mounts.append(mnt)
        return mnt

    def umount(self, mnt: str) -> None:
        run([*SNAPFS, "umount", mnt], cwd=REPO)
        self.mounts.remove(mnt)

    def close(self) -> None:
        for m in list(self.mounts):
            run([*SNAPFS, "umount", "--force", m], cwd=REPO, check=False)
        self.host.stop()
        shutil.rmtree(self.out, ignore_errors=True)

    # -- copy ---------------------------------------------------------------------

    def build_disk(self) -> tuple[str, str]:
        remote = os.path.join(self.host.root, "copy")
        local = os.path.join(self.base, "local")
        os.makedirs(local, exist_ok=True)
        cmds = [f"write -P {1 + i % 250} {i * 8}M 4M" for i in range(128)]  # 512 MiB in 4 MiB pieces
        self.host.run("mkdir", "-p", remote)
        self.host.run("qemu-img", "create", "-q", "-f", "qcow2", f"{remote}/disk.qcow2", "1G")
        args = []
        for c in cmds:
            args += ["-c", c]
        self.host.run("qemu-io", "-f", "qcow2", *args, f"{remote}/disk.qcow2")
        self.host.run("cp", f"{remote}/disk.qcow2", f"{local}/disk.qcow2")
        return remote, local

    def nbdcopy_local(self, image: str) -> float:
        """nbdcopy from a local qemu-nbd: the local transport's own speed."""
        sock = os.path.join(self.base, "local-anchor.sock")
        server = subprocess.Popen(["qemu-nbd", "--read-only", "--shared=8", "--persistent", "-f", "qcow2",
                                   f"--socket={sock}", "--cache=writeback", image])
        try:
            for _ in range(500):
                if os.path.exists(sock):
                    break
                time.sleep(0.01)
            time.sleep(0.2)
            out = os.path.join(self.out, "anchor.raw")
            times = []
            for _ in range(self.reps):
                times.append(timed(["nbdcopy", f"nbd+unix:///?socket={sock}", out]))
                os.unlink(out)
            return statistics.median(times)
        finally:
            server.kill()
            server.wait()

    def nbdcopy_anchor(self, remote_image: str, alias: str) -> float:
        """nbdcopy from a qemu-nbd on the host, its socket forwarded over one
        ssh master connection (with snapfs's cipher preference), through
        ``alias``: the transport snapfs uses."""
        ctl = os.path.join(self.base, "anchor.ctl")
        ssh = ["ssh", "-F", self.host.config, "-S", ctl]
        master = subprocess.Popen([*ssh, "-M", "-N", "-o", "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
                                   alias], stdin=subprocess.DEVNULL)
        try:
            for _ in range(500):
                if run([*ssh, "-O", "check", alias], check=False).returncode == 0:
                    break
                time.sleep(0.02)
            rsock = f"/tmp/snapfs-bench-anchor-{os.getpid()}.sock"
            server = subprocess.Popen([*ssh, alias, "exec", "qemu-nbd", "--read-only", "--shared=8",
                                       "--persistent", "-f", "qcow2", f"--socket={rsock}", "--cache=writeback",
                                       remote_image], stdin=subprocess.PIPE)
            time.sleep(1)
            lsock = os.path.join(self.base, "anchor.sock")
            if os.path.exists(lsock):
                os.unlink(lsock)
            run([*ssh, "-O", "forward", "-L", f"{lsock}:{rsock}", alias])
            out = os.path.join(self.out, "anchor.raw")
            times = []
            for _ in range(self.reps):
                times.append(timed(["nbdcopy", f"nbd+unix:///?socket={lsock}", out]))
                os.unlink(out)
            server.kill()
            run([*ssh, alias, "pkill", "-f", rsock], check=False)
            return statistics.median(times)
        finally:
            run([*ssh, "-O", "exit", alias], check=False)
            master.wait()

    def copy(self) -> None:
        remote, local = self.build_disk()
        view = "disk.qcow2/chain/00-disk.raw"
        lm = self.mount(["--images", local], "m-local")
        rm = self.mount(["--images", self.host.url(remote)], "m-remote")
        sm = self.mount(["--images", self.host.url(remote, self.slow)], "m-slow")
        out = os.path.join(self.out, "out.raw")
        res: dict[str, list[float]] = {k: [] for k in ("cp local", "cp remote", "convert local",
                                                        "convert remote", "cp remote +delay")}
        host_cpu = []
        for _ in range(self.reps):
            for key, mnt in (("local", lm), ("remote", rm)):
                drop_caches()
                before = cpu_of(self.host.pids_of())
                res[f"cp {key}"].append(timed(["cp", "--sparse=always", os.path.join(mnt, view), out]))
                if key == "remote":
                    host_cpu.append(cpu_of(self.host.pids_of()) - before)
                os.unlink(out)
                drop_caches()
                res[f"convert {key}"].append(timed(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                                                    os.path.join(mnt, view), out]))
                os.unlink(out)
            drop_caches()
            res["cp remote +delay"].append(timed(["cp", "--sparse=always", os.path.join(sm, view), out]))
            os.unlink(out)
        anchor = self.nbdcopy_anchor(f"{remote}/disk.qcow2", self.slow)
        fast = self.nbdcopy_anchor(f"{remote}/disk.qcow2", ALIAS)
        here = self.nbdcopy_local(f"{local}/disk.qcow2")
        med = {k: statistics.median(v) for k, v in res.items()}
        size = 1024  # MiB read (the whole disk: holes are read as zeros by cp)
        for k, v in med.items():
            log(f"copy: {k:22s} {v:6.2f} s  ({size / v:6.0f} MiB/s)   runs: "
                + ", ".join(f"{x:.2f}" for x in res[k]))
        log(f"copy: nbdcopy +delay         {anchor:6.2f} s  ({size / anchor:6.0f} MiB/s)")
        log(f"copy: nbdcopy over ssh       {fast:6.2f} s  ({size / fast:6.0f} MiB/s)")
        log(f"copy: nbdcopy local          {here:6.2f} s  ({size / here:6.0f} MiB/s)")
        log(f"copy: the transport alone, nbdcopy over ssh / local = {fast / here:.2f}x (this machine is "
            "also the host: its ssh and sshd share these CPUs)")
        hc = statistics.median(host_cpu)
        log(f"copy: the host's own CPU (its sshd and qemu-nbd, on this machine's {os.cpu_count()} CPUs) "
            f"during cp remote: {hc:.2f} s; cp remote less half of it (what a host of its own would "
            f"take off this machine): {med['cp remote'] - hc / 2:.2f} s, "
            f"{(med['cp remote'] - hc / 2) / med['cp local']:.2f}x local")
        for what in ("cp", "convert"):
            ratio = med[f"{what} remote"] / med[f"{what} local"]
            log(f"copy: {what} remote / local = {ratio:.2f}x (target <= 1.3x): "
                + ("PASS" if ratio <= 1.3 else "MISS"))
        ratio = anchor / med["cp remote +delay"]
        log(f"copy: cp throughput / nbdcopy's at {self.delay * 1000:.0f} ms = {ratio:.2f}x "
            "(target >= 0.7x): " + ("PASS" if ratio >= 0.7 else "MISS"))
        for m in (lm, rm, sm):
            self.umount(m)

    # -- scale ----------------------------------------------------------------------

    def scale(self, disks: int = 100, layers: int = 5) -> None:
        remote = os.path.join(self.host.root, "scale")
        self.host.sh(f'''set -e
mkdir -p "$1/disk0000"; cd "$1/disk0000"
qemu-img create -q -f qcow2 l0.qcow2 64M
qemu-io -c "write -P 1 0 64k" l0.qcow2 >/dev/null
for i in $(seq 1 {layers - 1}); do
    qemu-img create -q -f qcow2 -b l$((i - 1)).qcow2 -F qcow2 l$i.qcow2
    qemu-io -c "write -P $((i + 1)) $((i * 64))k 64k" l$i.qcow2 >/dev/null
done
cd "$1"
for n in $(seq 1 {disks - 1}); do cp -a disk0000 "disk$(printf %04d "$n")"; done
''', remote)
        url = self.host.url(remote, self.slow)
        mounts, lists = [], []
        for _ in range(self.reps):
            mnt = os.path.join(self.base, "m-scale")
            os.makedirs(mnt, exist_ok=True)
            t = time.monotonic()
            run([*SNAPFS, "mount", "--images", url, "--ssh-config", self.host.config, mnt], cwd=REPO)
            mounts.append(time.monotonic() - t)
            self.mounts.append(mnt)
            t = time.monotonic()
            ls = run(["ls", "-lR", mnt], check=False)
            lists.append(time.monotonic() - t)
            files = ls.stdout.count(b".raw\n")
            if ls.returncode or files != disks * layers * 2:
                log(f"scale: ls -lR failed ({ls.returncode}, {files} views): {ls.stderr[-500:]!r}")
            self.umount(mnt)
        m, ls_ = statistics.median(mounts), statistics.median(lists)
        runs = ", ".join(f"{a:.1f}+{b:.1f}" for a, b in zip(mounts, lists, strict=True))
        log(f"scale: {disks} disks x {layers} layers at {self.delay * 1000:.0f} ms each way: "
            f"mount {m:.1f} s, first ls -lR {ls_:.1f} s (runs: {runs})")
        log(f"scale: mount + first ls -lR = {m + ls_:.1f} s (target <= 30 s): " + ("PASS" if m + ls_ <= 30 else "MISS"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.025, help="seconds added each way (default 0.025)")
    ap.add_argument("--only", choices=["copy", "scale"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        log("bench_remote: needs root (the test host's mount namespace and sshd)")
        return 1
    base = tempfile.mkdtemp(prefix="snapfs-bench-remote-", dir="/var/tmp")
    os.chmod(base, 0o755)
    b = Bench(base, args.reps, args.delay)
    try:
        if args.only in (None, "copy"):
            b.copy()
        if args.only in (None, "scale"):
            b.scale()
    finally:
        b.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
