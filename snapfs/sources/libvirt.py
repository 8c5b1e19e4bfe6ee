"""VMs from libvirt: domains, disks, snapshots, checkpoints, backup jobs.

``snapfs mount --connect URI`` lays out ``DOMAIN/TARGET/{chain,layers,dirty}``
for every selected domain from what libvirt knows and what the images hold:

- chain views are named after snapshots (``NN-NAME.raw``, the disk as it was
  when the snapshot was taken: the image that was active then, with its
  backing chain) plus ``current.raw``, the disk now;
- layer views are named after the files, as in image mode;
- dirty views are named after checkpoints.

A shut-off domain is read through qemu-nbd, like an image directory. A running
domain's active layer is never opened: snapfs starts a libvirt pull-mode
backup job and reads ``current`` and one checkpoint's dirty view from the
job's NBD server (``backup.py``). Its backing layers open read-only as usual.

Every (checkpoint, disk) pair gets a dirty view. Its ``backupmode`` is
``incremental`` only when a bitmap chain for that checkpoint can be trusted
on that disk (``bitmap_verdict``); otherwise it is ``full``, every area
counts as changed, and the reason goes to the status file and the log. A
doubtful bitmap is never used.

``LibvirtSource`` is the source (``base.py``) a ``--connect`` mount holds:
each domain is a unit, laid out anew by ``snapfs refresh MOUNTPOINT DOMAIN``.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

import libvirt
import trio

from ..errors import BackupError, ControlError, MountError, SourceError
from ..formats import FORMATS
from ..formats.chain import Chains, Disk, Layer
from ..hosts.local import LOCAL
from ..nbd.spec import ExportSpec
from ..needs import file_needs
from ..views import FOLDERS, View, escape_name, link_layers, mark_writable, view_basename
from ..views.chain import BackupChainView, ChainView
from ..views.dirty import DirtyView, FullDirtyView, UnionDirtyView
from ..views.layer import LayerView
from .backup import BackupJob, abort_jobs_in, end_remote_jobs
from .base import Refresh, RefreshPlan, Scan, Unit
from .bitmaps import backing_verdict, bitmap_verdict
from .libvirt_xml import CheckpointDef, DiskDef, SnapshotDef, parse_checkpoint, parse_disks, parse_snapshot

log = logging.getLogger(__name__)

CURRENT = "current"
OPEN_TIMEOUT = 30  # seconds for libvirt to accept a connection


def libvirt_message(e: libvirt.libvirtError) -> str:
    return (e.get_error_message() or str(e)).strip()


def _ordered(items, parse):
    """Parsed checkpoints or snapshots, oldest first (libvirt's topological order breaks ties)."""
    parsed = [parse(x.getXMLDesc(0)) for x in items]
    return [p for _, p in sorted(enumerate(parsed), key=lambda ip: (ip[1].created, ip[0]))]


# Beside the disks' directories, as files: a loop over DOMAIN/*/ sees disks only.
DEFINITION = "domain.xml"
# Numbered, not named: the directory is listed by anyone who may list the
# domain's, and a checkpoint's name is the disks' (their bitmaps) to tell.
CHECKPOINT_FILE = "checkpoint-{number}.xml"


# -- one domain ------------------------------------------------------------------------


def _chain_spec(chain: list[Layer], **kw) -> ExportSpec:
    return ExportSpec.of(reversed(chain), **kw)


@dataclass
class DomainPlan:
    """What one domain contributes to the mount."""

    name: str
    dirname: str
    running: bool
    disk_dirs: list[str] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    job: BackupJob | None = None
    # (name in the domain's directory, content): domain.xml, checkpoint-NN.xml
    files: list[tuple[str, bytes]] = field(default_factory=list)
    disk_tops: list[Layer] = field(default_factory=list)  # of every disk served


class DomainReader:
    """Reads one domain and decides its views (blocking libvirt calls: run in a thread)."""

    def __init__(self, dom: libvirt.virDomain, rundir: str, since: str | None = None,
                 new_checkpoint: str | None = None, strict: bool = False, host=LOCAL):
        self.dom = dom
        self.strict = strict  # the user named this domain: options that cannot apply are errors
        self.rundir = rundir
        self.since = since
        self.new_checkpoint = new_checkpoint
        self.host = host
        self.chains = Chains(host)

    def plan(self) -> DomainPlan:
        dom = self.dom
        name = dom.name()
        try:
            running = bool(dom.isActive())
            xml = ET.fromstring(dom.XMLDesc(0))
            listed = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            checkpoints = _ordered(listed, parse_checkpoint)
            snapshots = _ordered(dom.listAllSnapshots(libvirt.VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL),
                                 parse_snapshot)
        except libvirt.libvirtError as e:
            raise SourceError(f"domain {name}: {libvirt_message(e)}") from None
        plan = DomainPlan(name=name, dirname=escape_name(name), running=running)
        disks = parse_disks(xml)
        served = []
        for d in disks:
            why = d.unsupported()
            if why:
                plan.missing.append((f"{plan.dirname}/{d.target}", why))
            else:
                served.append(d)
        if running:
            since = self._since(checkpoints, plan)
            others = [d.target for d in disks if d not in served]
            plan.job = self._start_job(xml, served, others, checkpoints, since, plan)
        else:
            since = None
            if self.new_checkpoint:
                msg = (f"domain {name} is shut off: libvirt makes checkpoints only for running "
                       f"domains, so {self.new_checkpoint!r} was not made")
                if self.strict:
                    raise SourceError(msg)
                plan.notes.append(f"{plan.dirname}: {msg}")
        try:
            if plan.job is not None and self.new_checkpoint:
                # The job made a checkpoint: the next incremental starts there.
                listed = dom.listAllCheckpoints(libvirt.VIR_DOMAIN_CHECKPOINT_LIST_TOPOLOGICAL)
            plan.files = self._definition(dom, listed)
        except libvirt.libvirtError as e:
            if plan.job is not None:
                plan.job.stop()
            raise SourceError(f"domain {name}: {libvirt_message(e)}") from None
        for d in served:
            self._disk(plan, d, snapshots, checkpoints, since)
        return plan

    @staticmethod
    def _definition(dom, checkpoints) -> list[tuple[str, bytes]]:
        """What defining the domain again on another host takes: its inactive
        definition (``virsh dumpxml --inactive``: no passwords) and each
        checkpoint as ``virsh checkpoint-dumpxml --no-domain`` gives it, for
        ``virsh checkpoint-create --redefine``, numbered in libvirt's
        topological order: parents first, as redefining needs them (creation
        times may not be, after a clock step)."""
        files = [(DEFINITION, dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE).encode())]
        width = max(2, len(str(max(len(checkpoints) - 1, 0))))
        for i, cp in enumerate(checkpoints):
            xml = cp.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
            files.append((CHECKPOINT_FILE.format(number=f"{i:0{width}d}"), xml.encode()))
        return files

    # -- running domains --------------------------------------------------

    def _since(self, checkpoints: list[CheckpointDef], plan: DomainPlan) -> CheckpointDef | None:
        if self.since is not None:
            found = [c for c in checkpoints if c.name == self.since]
            if not found:
                have = ", ".join(c.name for c in checkpoints) or "none"
                raise SourceError(f"domain {plan.name} has no checkpoint {self.since!r} (it has: {have})")
            return found[0]
        return checkpoints[-1] if checkpoints else None

    def _start_job(self, xml, served, others, checkpoints, since, plan) -> BackupJob | None:
        if self.new_checkpoint and any(c.name == self.new_checkpoint for c in checkpoints):
            raise SourceError(f"domain {plan.name} already has a checkpoint {self.new_checkpoint!r}")
        modes: dict[str, tuple[str, str | None]] = {}
        for d in served:
            if since is None:
                modes[d.target] = ("full", None)
            elif d.target not in since.disks:
                modes[d.target] = ("full", f"disk {d.target} was attached after checkpoint {since.name!r} "
                                           "was made, so it has no bitmap for it (backupmode='full')")
            elif since.disks[d.target] is None:
                modes[d.target] = ("full", f"checkpoint {since.name!r} does not track disk {d.target} "
                                           "(checkpoint='no')")
            else:
                chain, _ = self.chains.chain(self.chains.layer(d.source, d.format))
                why = backing_verdict(chain, since.disks[d.target], since.sources.get(d.target))
                modes[d.target] = ("full", why) if why else ("incremental", None)
        try:
            job = BackupJob.start(self.dom, xml, self.rundir, served, modes,
                                  since.name if since else None, self.new_checkpoint, others, host=self.host)
        except BackupError as e:
            plan.notes.append(f"{plan.dirname}: {e}")  # logged with the status file's notes
            return None
        for note in job.notes:
            plan.notes.append(f"{plan.dirname}: {note}")
        return job

    # -- one disk ----------------------------------------------------------

    def _disk(self, plan: DomainPlan, d: DiskDef, snapshots, checkpoints, since) -> None:
        rel = f"{plan.dirname}/{d.target}"
        plan.disk_dirs.append(rel)
        top = self.chains.layer(d.source, d.format)
        plan.disk_tops.append(top)
        chain, cut = self.chains.chain(top)
        disk = Disk(relpath=rel, chain=chain, complete=cut is None, cut_reason=cut)
        whole = disk.complete and all(lay.problem is None for lay in chain)
        below_ok = disk.complete and all(lay.problem is None for lay in chain[:-1])
        views, missing = plan.views, plan.missing

        # chain/: one view per snapshot, then current.
        width = max(2, len(str(max(len(snapshots) - 1, 0))))
        branches: list[list[Layer]] = []
        for i, snap in enumerate(snapshots):
            base = f"{i:0{width}d}-{escape_name(snap.name)}"
            layer, why = self._snapshot_top(snap, d)
            if layer is not None:
                schain, scut = self.chains.chain(layer)
                bad = next((lay for lay in schain if lay.problem), None)
                if scut:
                    why = f"snapshot {snap.name!r}: {scut}"
                elif bad is not None:
                    why = f"snapshot {snap.name!r}: {bad.path}: {bad.problem}"
                elif snap.disks[d.target][0] == "internal":
                    # Inside the image: the chain view only (its layers are the disk's own).
                    spec = _chain_spec(schain, snapshot=snap.name)
                    views.append(ChainView(disk, base, layer, spec, layer.size))
                else:
                    views.append(ChainView(disk, base, layer, _chain_spec(schain), layer.size))
                    branches.append(schain)
            if why:
                missing.append((f"{rel}/chain/{base}.raw", why))

        job = plan.job
        if plan.running:
            if job is None:
                missing.append((f"{rel}/chain/{CURRENT}.raw", "the domain runs and no backup job could "
                                "be started (see the notes above)"))
            elif d.target not in job.exports:
                missing.append((f"{rel}/chain/{CURRENT}.raw", "libvirt's backup job does not export "
                                "this disk"))
            else:
                exp = job.exports[d.target]
                spec = _chain_spec(chain, socket=job.socket, export=exp.name)
                views.append(BackupChainView(disk, CURRENT, top, spec, exp.size))
        elif whole:
            views.append(ChainView(disk, CURRENT, top, _chain_spec(chain), top.size))
        else:
            bad = next((lay for lay in chain if lay.problem), None)
            missing.append((f"{rel}/chain/{CURRENT}.raw", cut or f"{bad.path}: {bad.problem}"))

        self._layers(plan, disk, chain, branches)
        self._dirty(plan, disk, d, checkpoints, since, whole if not plan.running else below_ok)

    def _snapshot_top(self, snap: SnapshotDef, d: DiskDef) -> tuple[Layer | None, str | None]:
        kind, overlay = snap.disks.get(d.target, (None, None))
        if kind is None:
            return None, f"snapshot {snap.name!r} does not include disk {d.target}"
        if kind not in ("external", "internal"):
            return None, f"snapshot {snap.name!r} did not snapshot disk {d.target} (snapshot='{kind}')"
        path, fmt = snap.sources.get(d.target, (None, None))
        if kind == "internal" and fmt != "qcow2":
            return None, f"snapshot {snap.name!r} of {d.target} is internal to a {fmt} image"
        if path is None and overlay:
            ov = self.chains.layer(overlay, "qcow2")
            path, fmt = ov.backing_path, ov.backing_format
        if not path or fmt not in FORMATS:
            return None, f"snapshot {snap.name!r} does not say which image of {d.target} it kept"
        return self.chains.layer(path, fmt), None

    def _layers(self, plan: DomainPlan, disk: Disk, chain: list[Layer], branches) -> None:
        rel = disk.relpath
        width = max(2, len(str(max(len(c) for c in [chain, *branches]) - 1)))
        seen: set[str] = set()
        names: set[str] = set()
        for c, is_current in [(chain, True)] + [(b, False) for b in branches]:
            for i, layer in enumerate(c):
                key = layer.real
                if key in seen:
                    continue
                seen.add(key)
                base = view_basename(i, width, layer)
                n = 2
                while base in names:
                    base = f"{view_basename(i, width, layer)}~{n}"
                    n += 1
                names.add(base)
                if plan.running and is_current and layer is chain[-1]:
                    plan.missing.append((f"{rel}/layers/{base}.raw", "the active layer of a running "
                                         "domain is read only through its backup job: chain/current.raw"))
                elif layer.problem is not None:
                    plan.missing.append((f"{rel}/layers/{base}.raw", layer.problem))
                else:
                    plan.views.append(LayerView(disk, base, layer, ExportSpec.of([layer]),
                                                layer.size))

    def _dirty(self, plan, disk: Disk, d: DiskDef, checkpoints, since, readable: bool) -> None:
        rel = disk.relpath
        chain, top = disk.chain, disk.top
        known = set()
        for cp in checkpoints:
            base = escape_name(cp.name)
            path = f"{rel}/dirty/{base}.raw"
            bitmap = cp.disks.get(d.target)
            if bitmap:
                known.add(bitmap)
            if plan.running:
                self._running_dirty(plan, disk, d, cp, since, base)
                continue
            if not readable:
                plan.missing.append((path, "dirty views read the whole chain, which is not available"))
                continue
            spec = _chain_spec(chain)
            if d.target not in cp.disks:
                reason = (f"disk {d.target} was attached after checkpoint {cp.name!r} was made, so it has "
                          "no bitmap for it (backupmode='full')")
            elif bitmap is None:
                reason = f"checkpoint {cp.name!r} does not track disk {d.target} (checkpoint='no')"
            else:
                holding, reason = bitmap_verdict(chain, bitmap, cp.sources.get(d.target))
                if reason is None:
                    specs = [ExportSpec.of([lay], bitmap=bitmap) for lay in holding]
                    plan.views.append(UnionDirtyView(disk, base, top, spec, top.size, bitmap, specs))
                    continue
            plan.views.append(FullDirtyView(disk, base, top, spec, top.size, bitmap or cp.name, reason))
            plan.notes.append(f"{path}: full: {reason}")
        # A running domain's active image has a stale header: its backing files tell.
        for layer in chain[:-1] if plan.running else chain:
            for bm in layer.bitmaps:
                if bm.name not in known:
                    plan.notes.append(f"{rel}: image {layer.path} holds bitmap {bm.name!r}, which no "
                                      f"checkpoint of domain {plan.name} knows; it is not used")

    def _running_dirty(self, plan, disk, d, cp, since, base) -> None:
        path = f"{disk.relpath}/dirty/{base}.raw"
        job = plan.job
        if since is None or cp.name != since.name:
            plan.missing.append((path, f"the backup job of running domain {plan.name} serves checkpoint "
                                 f"{since.name if since else '(none)'}; to see this one: snapfs refresh "
                                 f"MOUNTPOINT {plan.name} --since {cp.name}"))
            return
        if job is None or d.target not in job.exports:
            plan.missing.append((path, "no backup job exports this disk (see the notes above)"))
            return
        exp = job.exports[d.target]
        bitmap = cp.disks.get(d.target) or cp.name
        top = disk.top
        if exp.bitmap:
            spec = _chain_spec(disk.chain, socket=job.socket, export=exp.name, bitmap=exp.bitmap)
            view = DirtyView(disk, base, top, spec, exp.size, bitmap)
            view.backupmode = "incremental"
        else:
            spec = _chain_spec(disk.chain, socket=job.socket, export=exp.name)
            view = FullDirtyView(disk, base, top, spec, exp.size, bitmap, exp.reason)
            plan.notes.append(f"{path}: full: {exp.reason}")
        plan.views.append(view)


# -- the source -------------------------------------------------------------------------

KEEPALIVE_INTERVAL = 5  # seconds between keepalive probes
KEEPALIVE_COUNT = 3  # probes unanswered before the connection is closed
LEFTOVER_TIMEOUT = 30  # seconds to end jobs through a new connection at unmount

_event_loop: threading.Thread | None = None


def _start_event_loop() -> None:
    """libvirt's keepalive needs its event loop running: one thread per process."""
    global _event_loop
    if _event_loop is None:
        libvirt.virEventRegisterDefaultImpl()

        def loop():
            while True:
                libvirt.virEventRunDefaultImpl()

        _event_loop = threading.Thread(target=loop, name="libvirt-events", daemon=True)
        _event_loop.start()


class LibvirtSource:
    """Every selected domain of one libvirt connection; each domain is a unit."""

    kind = "libvirt"

    def __init__(self, uri: str, domains: list[str] | None, rundir: str,
                 since: str | None = None, new_checkpoint: str | None = None, writable: bool = False,
                 host=LOCAL, connect_uri: str | None = None):
        self.uri = uri
        self.label = uri
        self.host = host
        self.connect_uri = connect_uri or uri  # another host's: through snapfs's ssh connection
        self.names = domains or []
        self.rundir = rundir
        self.since = since
        self.new_checkpoint = new_checkpoint
        self.writable = writable
        self.conn: libvirt.virConnect | None = None
        self.plans: dict[str, DomainPlan] = {}

    # -- the source protocol (base.py) -------------------------------------------

    async def open(self) -> None:
        if not self.host.connected:
            await self.host.reach()
        try:
            with trio.fail_after(OPEN_TIMEOUT):
                await trio.to_thread.run_sync(self.connect, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise MountError(f"libvirt at {self.uri} did not answer within {OPEN_TIMEOUT} s") from None
        except SourceError as e:
            raise MountError(str(e)) from None

    async def scan(self) -> Scan:
        try:
            plans = await trio.to_thread.run_sync(self.plan_all)
        except SourceError as e:
            await trio.to_thread.run_sync(self.close)
            raise MountError(str(e)) from None
        return Scan(units={p.dirname: self.unit(p) for p in plans},
                    notes=[] if plans else [f"no domains at {self.uri}"])

    async def plan_refresh(self, request: Refresh, laid: dict[str, Unit]) -> RefreshPlan:
        """A new point in time for one domain: its job ended, the domain read again."""
        domain = request.domain
        if domain is None:
            raise ControlError("a libvirt mount is refreshed one domain at a time: "
                               "snapfs refresh MOUNTPOINT DOMAIN")
        old = self.plans.get(domain)
        if old is None:
            raise ControlError(f"domain {domain!r} is not in this mount")

        async def build(keys):
            plan = await trio.to_thread.run_sync(self.refresh, domain, request.since, request.checkpoint)
            return {plan.dirname: self.unit(plan)}

        def answer(done: list[str], busy: dict[str, str]) -> str:
            if busy:
                raise ControlError(f"files of domain {domain} are open: {', '.join(busy.values())}; "
                                   "close them and retry")
            plan = self.plans[domain]
            if not plan.running:
                return f"{domain}: read again (shut off)"
            if plan.job is None:
                raise ControlError(f"{domain}: no backup job could be started: "
                                   + "; ".join(plan.notes or ["see the log"]))
            return f"{domain}: new point in time " + time.strftime("%H:%M:%S")

        return RefreshPlan(keys=[old.dirname], build=build, answer=answer, all_or_nothing=True)

    def watcher(self):
        return None  # snapfs refresh MOUNTPOINT DOMAIN

    def unit(self, plan: DomainPlan) -> Unit:
        """A domain as a unit: its directory, each disk's with the folders, the views."""
        link_layers(plan.views)
        if self.writable:
            mark_writable(plan.views)
        disks = {v.disk.relpath: v.disk for v in plan.views}
        dirs: list[tuple[str, tuple | None]] = [(plan.dirname, None)]
        for rel in plan.disk_dirs:
            # A disk's directory and folders show the leaf's names, and take its permissions.
            disk = disks.get(rel)
            needs = file_needs(disk.top.path, disk.host) if disk is not None else None
            dirs += [(rel, needs)] + [(f"{rel}/{folder}", needs) for folder in FOLDERS]
        # The definition tells what the disks hold (their paths, the bitmaps):
        # for whoever can read every disk served, views or not (an image that
        # cannot be read grants nothing); with no disk served, the mounting user.
        every = {need: None for top in plan.disk_tops for need in file_needs(top.path, top.host)}
        defs = tuple(every) or None
        files = [(f"{plan.dirname}/{name}", content, defs) for name, content in plan.files]
        log.info("domain %s: %d disk(s), %d view(s)%s", plan.name, len(plan.disk_dirs), len(plan.views),
                 " (running: read through a backup job)" if plan.running else "")
        return Unit(key=plan.dirname, dirs=dirs, views=plan.views, files=files, missing=plan.missing,
                    notes=plan.notes)

    # -- libvirt (blocking: in worker threads) ------------------------------------

    def connect(self) -> None:
        libvirt.registerErrorHandler(lambda ctx, err: None, None)  # no stderr noise
        _start_event_loop()
        try:
            self.conn = libvirt.open(self.connect_uri)
            # A libvirtd that stops answering closes the connection (its
            # calls then fail) instead of hanging them.
            self.conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            there = self.conn.getHostname() if self.host.name is None else None
        except libvirt.libvirtError as e:
            raise SourceError(f"cannot connect to {self.uri}: {libvirt_message(e)}") from None
        if there is not None and there.lower() not in (socket.gethostname().lower(), socket.getfqdn().lower()):
            # Its disk paths are paths on that host: never read here.
            self.conn.close()
            self.conn = None
            raise SourceError(f"the libvirt at {self.uri} runs on {there}, not on this machine: snapfs reads "
                              f"another host's disks through ssh (qemu+ssh://{there}/system)")

    def domains(self) -> list[libvirt.virDomain]:
        if self.names:
            out = []
            for n in self.names:
                try:
                    out.append(self.conn.lookupByName(n))
                except libvirt.libvirtError:
                    raise SourceError(f"no domain {n!r} at {self.uri}") from None
            return out
        return sorted(self.conn.listAllDomains(0), key=lambda d: d.name())

    def plan_all(self) -> list[DomainPlan]:
        """Plan every domain; a failure stops the jobs already started."""
        try:
            for dom in self.domains():
                plan = self.plan_domain(dom)
                self.plans[plan.name] = plan
        except BaseException:
            self.close()
            raise
        return list(self.plans.values())

    def plan_domain(self, dom) -> DomainPlan:
        return DomainReader(dom, self.rundir, self.since, self.new_checkpoint,
                            strict=bool(self.names), host=self.host).plan()

    def refresh(self, name: str, since: str | None, new_checkpoint: str | None) -> DomainPlan:
        """End the domain's backup job (if any) and read the domain again.

        ``since``/``new_checkpoint`` are this refresh's own: the mount's
        ``--checkpoint`` is not made twice.
        """
        old = self.plans.get(name)
        if old is None:
            raise SourceError(f"domain {name!r} is not in this mount")
        try:
            dom = self.conn.lookupByName(name)
            have = [c.getName() for c in dom.listAllCheckpoints(0)]
        except libvirt.libvirtError as e:
            raise SourceError(f"domain {name}: {libvirt_message(e)}") from None
        if since is not None and since not in have:
            raise SourceError(f"domain {name} has no checkpoint {since!r} "
                              f"(it has: {', '.join(have) or 'none'})")
        if new_checkpoint is not None and new_checkpoint in have:
            raise SourceError(f"domain {name} already has a checkpoint {new_checkpoint!r}")
        if old.job is not None:
            old.job.stop()
            old.job = None
        plan = DomainReader(dom, self.rundir, since, new_checkpoint, strict=True, host=self.host).plan()
        self.plans[name] = plan
        return plan

    def close(self) -> None:
        """End every job; through a new connection if this one died (keepalive);
        then the ssh connection to the domains' host, if any."""
        try:
            self._close()
        finally:
            self.host.release()

    def _close(self) -> None:
        left = False
        for plan in self.plans.values():
            if plan.job is not None:
                left |= not plan.job.stop()
                plan.job = None
        if left and self.host.name is not None:
            # The connection to the host is lost: one of their own ends the jobs there.
            done = threading.Thread(target=end_remote_jobs, daemon=True, args=(
                self.uri, self.host.ssh_config, list(self.host.remote_dirs), self.rundir))
        elif left:
            done = threading.Thread(target=abort_jobs_in, args=(self.uri, self.rundir), daemon=True)
        if left:
            done.start()
            done.join(LEFTOVER_TIMEOUT)
            if done.is_alive():
                log.warning("libvirt does not answer: the backup jobs of this mount stay until the "
                            "next mount of their domains aborts them")
        if self.conn is not None:
            try:
                self.conn.close()
            except libvirt.libvirtError:
                pass
            self.conn = None
