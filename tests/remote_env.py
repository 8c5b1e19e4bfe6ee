"""A second "host" on this machine, reachable only through ssh.

``TestHost.start(base)`` makes:

- a private mount namespace (``unshare -m``), kept alive by one process,
  with a tmpfs over ``base/hostroot``: what is written there from inside the
  namespace is invisible to every process outside it (snapfs included), so
  the host's image paths do not exist for snapfs;
- an sshd inside it on 127.0.0.1 and a free port, with its own host key,
  authorized key and pid file (``UsePAM no``), logging to ``base/sshd.log``;
- an ssh config (``base/ssh_config``) for the alias ``testhost``:
  the key, a known_hosts file holding the host key, ``BatchMode``;
- ``run(cmd)``, ``write(path, data)``, ``sh(script)``: commands inside the
  namespace, as the host's own shell would run them (to build images there
  and to compare with the host's own files).

``stop()`` ends sshd and the namespace (its tmpfs goes with it). Needs root
(mount namespaces, sshd); CI runs as root.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

ALIAS = "testhost"

# The host's own libvirt: its directories bind-mounted over the machine's
# (persistent domains, sockets, logs), with none of the machine's domains, its
# networks not started (they would be the machine's bridges too: one network
# namespace).
LIBVIRT_SETUP = """
for d in run varlib varcache varlog etc; do mkdir -p {base}/libvirt/$d; done
cp -a /etc/libvirt/. {base}/libvirt/etc/
rm -f {base}/libvirt/etc/qemu/networks/autostart/* {base}/libvirt/etc/qemu/*.xml
rm -rf {base}/libvirt/etc/qemu/autostart
mount -t tmpfs -o mode=0755 snapfs-testhost-run /run
mkdir -p /run/sshd /run/lock
mkdir -p /var/lib/libvirt /var/cache/libvirt /var/log/libvirt
mount --bind {base}/libvirt/varlib /var/lib/libvirt
mount --bind {base}/libvirt/varcache /var/cache/libvirt
mount --bind {base}/libvirt/varlog /var/log/libvirt
mount --bind {base}/libvirt/etc /etc/libvirt
virtlogd -d
libvirtd -d
i=0
while [ ! -S /run/libvirt/libvirt-sock ]; do
    i=$((i + 1)); [ $i -lt 3000 ] || {{ echo "the test host's libvirtd made no socket within 60 s" >&2; exit 1; }}
    sleep 0.02
done
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TestHost:
    """sshd and images in a mount namespace of their own."""

    __test__ = False  # not a test class

    def __init__(self, base: str):
        self.base = base
        self.root = os.path.join(base, "hostroot")  # a tmpfs inside the namespace
        self.config = os.path.join(base, "ssh_config")
        self.known_hosts = os.path.join(base, "known_hosts")
        self.port = 0
        self.holder: subprocess.Popen | None = None
        self.sshd: subprocess.Popen | None = None
        self.relays: list = []
        self.libvirt = False

    @classmethod
    def start(cls, base: str, libvirt: bool = False) -> TestHost:
        """libvirt: the host runs its own libvirtd (and virtlogd), with its own
        /run, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
        /etc/libvirt, reached as qemu+ssh://testhost/system."""
        host = cls(base)
        host.libvirt = libvirt
        try:
            host._start()
        except BaseException:
            host.stop()
            raise
        return host

    def _keys(self) -> str:
        b = self.base
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f",
                            os.path.join(b, name)], check=True)
        shutil.copy(os.path.join(b, "user_key.pub"), os.path.join(b, "authorized_keys"))
        with open(os.path.join(b, "host_key.pub")) as f:
            kind, key = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write(f"[127.0.0.1]:{self.port} {kind} {key}\n")
        return f"{kind} {key}"

    def _start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        os.chmod(self.base, 0o755)  # sshd reads its files as root; keys stay 0600
        self.port = free_port()
        self._keys()
        b = self.base
        with open(os.path.join(b, "sshd_config"), "w") as f:
            f.write(f"""Port {self.port}
ListenAddress 127.0.0.1
HostKey {b}/host_key
AuthorizedKeysFile {b}/authorized_keys
PidFile {b}/sshd.pid
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
""")
        with open(self.config, "w") as f:
            f.write(f"""Host {ALIAS}
    HostName 127.0.0.1
    Port {self.port}
    User {self.ssh_user}
    IdentityFile {b}/user_key
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    BatchMode yes
""")
        # The namespace: one process keeps it; a tmpfs over hostroot inside.
        script = f"mount -t tmpfs -o mode=0755 snapfs-testhost {self.root}\n"
        if self.libvirt:
            script += LIBVIRT_SETUP.format(base=b)
        self.holder = subprocess.Popen(
            ["unshare", "-m", "--propagation", "slave", "sh", "-euc", script + "echo ok\nexec sleep infinity\n"],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, stderr=open(os.path.join(b, "namespace.log"), "wb"))
        if self.holder.stdout.readline().strip() != b"ok":
            with open(os.path.join(b, "namespace.log"), errors="replace") as f:
                said = f.read()[-2000:]
            raise RuntimeError(f"the test host's mount namespace could not be made: {said}")
        self.start_sshd()
        p = self.ssh("true", check=False)
        if p.returncode:
            with open(os.path.join(b, "sshd.log"), errors="replace") as f:
                said = f.read()[-2000:]
            raise RuntimeError(f"the test host's sshd does not let {self.ssh_user} in: "
                               f"{p.stderr.decode(errors='replace').strip()}; sshd says: {said}")

    @property
    def ssh_user(self) -> str:
        return pwd.getpwuid(os.getuid()).pw_name

    def start_sshd(self) -> None:
        """sshd in the namespace, listening when this returns."""
        b = self.base
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation directory
        with open(os.path.join(b, "sshd.log"), "ab") as log:
            self.sshd = subprocess.Popen(self.enter(["/usr/sbin/sshd", "-D", "-e", "-f", f"{b}/sshd_config"]),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.sshd.poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(b, "sshd.log"), errors="replace") as f:
                        said = f.read()[-2000:]
                    raise RuntimeError(f"the test host's sshd did not start: {said}") from None
                time.sleep(0.02)

    def stop_sshd(self) -> None:
        """The host drops off the network: sshd and every session it serves end
        (what they started, qemu-nbd, ends with its session)."""
        self.sshd.kill()
        self.sshd.wait()
        for pid in self.pids_of("sshd"):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def enter(self, cmd: list) -> list:
        """``cmd`` as run inside the host's namespace."""
        return ["nsenter", "-t", str(self.holder.pid), "-m", "--", *map(str, cmd)]

    def run(self, *cmd, check=True, **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        p = subprocess.run(self.enter(list(cmd)), **kw)
        if check and p.returncode:
            raise RuntimeError(f"on the test host: {cmd}: {p.stderr!r}")
        return p

    def sh(self, script: str, *args) -> str:
        return self.run("sh", "-c", script, "sh", *args).stdout.decode()

    def ssh(self, *cmd, check=True) -> subprocess.CompletedProcess:
        """A command through ssh, as snapfs would reach the host."""
        return subprocess.run(["ssh", "-F", self.config, ALIAS, "--", *cmd], capture_output=True, check=check)

    def _ns(self) -> str | None:
        try:
            return os.readlink(f"/proc/{self.holder.pid}/ns/mnt")
        except (OSError, AttributeError):
            return None

    def pids_of(self, name: str | None = None, ns: str | None = None) -> list[int]:
        """Processes (named ``name``) in the host's mount namespace."""
        ns = ns or self._ns()
        out = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or ns is None:
                continue
            try:
                with open(f"/proc/{pid}/comm") as f:
                    comm = f.read().strip()
                if (name is None or comm == name) and os.readlink(f"/proc/{pid}/ns/mnt") == ns:
                    out.append(int(pid))
            except OSError:
                continue
        return out

    def define(self, name: str, disk: str, start: bool = False) -> None:
        """A domain of the host's libvirt (``libvirt=True``) with one qcow2 disk,
        vda; no OS (a running one writes nothing); TCG, as /dev/kvm may be closed."""
        xml = (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory>"
               "<os><type arch='x86_64'>hvm</type></os><devices><disk type='file' device='disk'>"
               f"<driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>"
               "</disk></devices></domain>")
        self.run("sh", "-c", 'printf %s "$1" > "$2" && virsh -q -c qemu:///system define "$2" >/dev/null',
                 "sh", xml, f"{disk}.xml")
        if start:
            self.run("virsh", "-q", "-c", "qemu:///system", "start", name)

    def uri(self, alias: str = ALIAS) -> str:
        """The host's libvirt, through ssh."""
        return f"qemu+ssh://{alias}/system"

    def url(self, path: str, alias: str = ALIAS) -> str:
        return f"ssh://{alias}{path}"

    def slow_alias(self, delay: float) -> str:
        """An alias of the host reached through a relay adding ``delay`` seconds
        each way (``latency_relay.Relay``, stopped with the host)."""
        from latency_relay import Relay
        relay = Relay(self.port, delay)
        self.relays.append(relay)
        alias = f"{ALIAS}-{len(self.relays)}"
        with open(self.known_hosts) as f:
            key = f.readline().split(None, 1)[1]
        with open(self.known_hosts, "a") as f:
            f.write(f"[127.0.0.1]:{relay.port} {key}")
        with open(self.config) as f:
            block = f.read().split("\n", 1)[1].replace(f"Port {self.port}", f"Port {relay.port}")
        with open(self.config, "a") as f:
            f.write(f"Host {alias}\n{block}")
        return alias

    def stop(self) -> None:
        """sshd, what runs under it (sessions, qemu-nbd) and the namespace end."""
        ns = self._ns()
        for relay in self.relays:
            relay.stop()
        for p in (self.sshd, self.holder):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for pid in self.pids_of(ns=ns) if ns else ():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
