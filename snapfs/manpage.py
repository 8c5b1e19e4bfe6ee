"""Man pages, generated so they cannot drift from what they describe.

- ``snapfs(1)``: the commands and their options, from the argparse parser that
  ``--help`` prints (:func:`snapfs.cli._parser`), and the ``-o`` options of the
  mount(8) form (``snapfs SOURCE MOUNTPOINT -o OPTIONS``), from the ``mount``
  subcommand's options.
- ``snapfs-views(7)``: docs/views.md, through pandoc (Debian's, 2.17 on
  bookworm): tables become tbl(1) tables, and views.md is read as GitHub
  shows it (nested lists, code, emphasis, links). docutils' rst2man reads
  reStructuredText, not markdown; go-md2man (also in Debian) leaves most
  table cells on one line, unwrapped, so its tables run far past the page.

``python -m snapfs.manpage OUTDIR`` writes ``OUTDIR/man1/snapfs.1`` and
``OUTDIR/man7/snapfs-views.7`` (``make setup`` does, into ``.venv/share/man``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

VIEWS_MD = Path(__file__).resolve().parent.parent / "docs" / "views.md"

# --columns: pandoc gives a pipe table fixed column widths (70n in all, plus
# the gaps: wider than the page) when a line of it is longer than this; below
# it, tbl fits the columns to the page. --wrap=preserve keeps the source's lines.
PANDOC = ["pandoc", "--to=man", "--columns=10000", "--wrap=preserve"]
# docs/views.md as GitHub shows it (a backslash before a space is a
# backslash), no link made of a bare URI, no emoji made of ":name:".
GFM = "gfm-autolink_bare_uris-emoji"

# --------------------------------------------------------------------- roff

# Characters groff names, with ASCII fallbacks (LANG=C renders them too).
_GLYPHS = {"\u2014": r"\(em", "\u2013": r"\(en", "\u2026": r".\|.\|.", "\u201c": r"\(lq",
           "\u201d": r"\(rq", "\u2018": r"\(oq", "\u2019": r"\(cq", "\u2192": r"\(->",
           "\u2190": r"\(<-", "\u00d7": r"\(mu", "\u2264": r"\(<=", "\u2265": r"\(>=",
           "\u00a0": r"\ "}


def _escape(text: str) -> str:
    """Text for a roff text line: backslashes as \\(rs, non-ASCII as groff's
    named glyphs or \\[uXXXX], and every hyphen a \\- (ASCII '-' on the
    terminal, and no place to break a line: options, commands and paths stay
    whole)."""
    out = []
    for c in text:
        if c == "\\":
            out.append(r"\(rs")
        elif c == "-":
            out.append(r"\-")
        elif c in _GLYPHS:
            out.append(_GLYPHS[c])
        elif ord(c) > 127:
            out.append(f"\\[u{ord(c):04X}]")
        else:
            out.append(c)
    return "".join(out)


def _font(face: str, text: str, outer: str = "R") -> str:
    return text if face == outer else f"\\f{face}{text}\\f{outer}"


def _lines(text: str) -> list[str]:
    """Roff text lines: no leading blanks, none starting with a control character."""
    out = []
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        if line[0] in ".'":
            line = r"\&" + line
        out.append(line)
    return out


def _quote_arg(text: str) -> str:
    """A macro argument (already escaped text)."""
    return '"' + text.replace('"', r"\(dq") + '"'


# ------------------------------------------------------------ markdown inline

_INLINE = re.compile(
    r"`([^`]+)`"                                   # 1 code
    r"|\*\*(.+?)\*\*"                              # 2 bold
    r"|(?<![\w*])\*(?![\s*])(.+?)(?<![\s*])\*(?![\w*])"  # 3 italic
    r"|\[([^\]]+)\]\([^)\s]*\)",                   # 4 link text
    re.S)


def md_inline(text: str, outer: str = "R") -> str:
    """Markdown inline markup as roff (one or more text lines, unprefixed)."""
    out, pos = [], 0
    for m in _INLINE.finditer(text):
        out.append(_escape(text[pos:m.start()]))
        code, bold, ital, link = m.groups()
        if code is not None:
            out.append(_font("B", _escape(code), outer))
        elif bold is not None:
            out.append(_font("B", md_inline(bold, "B"), outer))
        elif ital is not None:
            out.append(_font("I", md_inline(ital, "I"), outer))
        else:
            out.append(md_inline(link, outer))
        pos = m.end()
    out.append(_escape(text[pos:]))
    return "".join(out)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


# ------------------------------------------------------------------- pages

def _version() -> str:
    try:
        from importlib.metadata import version
        return version("snapfs")
    except Exception:
        return ""


def _date(*sources: Path) -> str:
    """SOURCE_DATE_EPOCH if set, else the newest modification of the sources:
    the same sources give the same page."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        mtimes = [p.stat().st_mtime for p in sources if p.exists()]
        epoch = max(mtimes) if mtimes else 0
    return time.strftime("%Y-%m-%d", time.gmtime(int(float(epoch))))


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str | None]]:
    """(name, parser, help) of each subcommand, in the parser's order."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    out.append((name, sub, helps.get(name)))
    return out


def _visible(action: argparse.Action) -> bool:
    return action.help != argparse.SUPPRESS and not isinstance(action, argparse._SubParsersAction)


def _args_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's arguments as --help shows them ("DIR", "[URI]"), as roff."""
    formatter = parser._get_formatter()
    default = action.dest.upper()
    text = formatter._format_args(action, default) if action.nargs != 0 else ""
    return re.sub(r"[^\s\[\]|(){}.]+", lambda m: r"\fI" + _escape(m.group(0)) + r"\fR", text)


def _option_head(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    args = _args_text(parser, action)
    if not action.option_strings:
        return args
    return ", ".join(r"\fB" + _escape(o) + r"\fR" + (" " + args if args else "") for o in action.option_strings)


def _help_text(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help:
        return ""
    return parser._get_formatter()._expand_help(action)


def _usage_roff(parser: argparse.ArgumentParser, prog: str) -> list[str]:
    """The usage line --help prints, as a .SY synopsis: one unbreakable part per
    option (or group), options bold, arguments italic."""
    usage = " ".join(parser.format_usage().split())
    usage = usage.removeprefix("usage:").strip().removeprefix(prog).strip()
    parts, depth, cur = [], 0, ""
    for c in usage:
        if c in "[(":
            depth += 1
        elif c in "])":
            depth -= 1
        if c == " " and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)

    def token(m: re.Match) -> str:
        t = m.group(0)
        if t.startswith("-"):
            return r"\fB" + _escape(t) + r"\fR"
        if t == "...":
            return t
        return r"\fI" + _escape(t) + r"\fR"

    out = [f".SY {_quote_arg(_escape(prog))}"]
    for part in filter(None, parts):
        out.append(r"\&" + re.sub(r"[^\s\[\]|()]+", token, part).replace(" ", r"\ "))
    return out + [".YS"]


def _raw_description(text: str) -> list[str]:
    """A RawDescriptionHelpFormatter text: indented lines stay as they are
    (no-fill), the others are filled paragraphs."""
    out, para, pre = [".PP"], [], []

    def flush():
        nonlocal para, pre
        if para:
            out.extend(_lines(_escape("\n".join(para))))
            para = []
        if pre:
            strip = min(_indent(line) for line in pre)
            out.extend([".RS 2", ".nf"] + [r"\&" + _escape(line[strip:].rstrip()) for line in pre]
                       + [".fi", ".RE", ".PP"])
            pre = []

    for line in text.split("\n"):
        if not line.strip():
            flush()
            if out[-1] != ".PP":
                out.append(".PP")
        elif line.startswith((" ", "\t")):
            if para:
                flush()
            pre.append(line)
        else:
            if pre:
                flush()
            para.append(line)
    flush()
    while out and out[-1] == ".PP":
        out.pop()
    return out


def _md(text: str) -> list[str]:
    """Roff text lines for a little markdown (`code` bold, *argument* italic)."""
    return _lines(md_inline(text))


def _options_roff(parser: argparse.ArgumentParser, positionals: bool = True) -> list[str]:
    """A .TP entry per option, positionals (those with a help text) first, as --help lists them."""
    actions = [a for a in parser._actions if _visible(a)]
    chosen = ([a for a in actions if not a.option_strings and a.help] if positionals else []) \
        + [a for a in actions if a.option_strings]
    out = []
    for action in chosen:
        out += [".TP", _option_head(parser, action)]
        out += _lines(_escape(_help_text(parser, action))) or [r"\&"]
    return out


def _required_groups(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for group in getattr(parser, "_mutually_exclusive_groups", ()):
        names = [f"`{a.option_strings[-1]}`" for a in group._group_actions if _visible(a) and a.option_strings]
        if len(names) > 1:
            which = ", ".join(names[:-1]) + " and " + names[-1]
            out.append(f"Exactly one of {which} is required." if group.required
                       else f"At most one of {which} may be given.")
    return out


def mount_options(parser: argparse.ArgumentParser | None = None) -> list[tuple[str, argparse.Action]]:
    """(name, action) for every ``-o`` option of the mount(8) form.

    snapfs.cli.mount_options() when the cli has it (it is what snapfs
    accepts); otherwise every visible long option of ``snapfs mount``, named
    without its dashes and with ``-`` written ``_``."""
    from . import cli
    if parser is None and hasattr(cli, "mount_options"):
        return list(cli.mount_options())
    parser = parser or cli._parser()
    mount = {name: sub for name, sub, _ in _subparsers(parser)}["mount"]
    out = []
    for action in mount._actions:
        if not _visible(action) or isinstance(action, argparse._HelpAction):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs:
            out.append((longs[0][2:].replace("-", "_"), action))
    return out


# What mount(8), systemd and the kernel pass or keep, where the cli does not say.
_MOUNT8_DEFAULT = ("ro", "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail")
_MOUNT8_PREFIXES_DEFAULT = ("x-", "comment=")


def mount8_ignored() -> tuple[list[str], list[str]]:
    """(names, prefixes) of the options the mount(8) form accepts and ignores."""
    from . import cli
    names = sorted(getattr(cli, "MOUNT8_IGNORED", _MOUNT8_DEFAULT))
    prefixes = list(getattr(cli, "MOUNT8_IGNORED_PREFIXES", _MOUNT8_PREFIXES_DEFAULT))
    return names, prefixes


def _o_option_head(name: str, action: argparse.Action) -> str:
    head = r"\fB" + _escape(name) + r"\fR"
    if action.nargs == 0:
        return head
    metavar = action.metavar or action.dest.upper()
    if isinstance(metavar, tuple):
        metavar = ",".join(metavar)
    arg = r"\fB=\fI" + _escape(metavar) + r"\fR"
    return head + ("[" + arg + "]" if action.nargs == "?" else arg)


def _mount_options_roff(parser: argparse.ArgumentParser) -> list[str]:
    from . import cli
    uri = getattr(cli, "DEFAULT_URI", "qemu:///system")
    prefix = getattr(cli, "LIBVIRT_PREFIX", "libvirt:")
    opts = mount_options()
    names = {name for name, _ in opts}
    writable = next((name for name, a in opts if a.dest == "rw"), None)
    renamed = (f"; `--rw` is `{writable}` (**mount**(8) passes `rw` to every mount)"
               if writable and writable != "rw" else "")
    renamed += "; and `--foreground` has none (**mount**(8) waits for the command to return)"
    out = ['.SH "MOUNT OPTIONS"', ".PP",
           *_md("For **mount**(8), */etc/fstab* and systemd mount units, snapfs takes the form"),
           ".PP", ".RS 4",
           r"\fBsnapfs\fR \fISOURCE\fR \fIMOUNTPOINT\fR [\fB\-o\fR \fIOPTIONS\fR]",
           ".RE", ".PP",
           *_md("which fuse3's **mount.fuse3**(8) runs for `mount -t fuse.snapfs` *SOURCE MOUNTPOINT* "
                "`-o` *OPTIONS* (fstab type `fuse.snapfs`); snapfs runs it as `snapfs mount`. "
                "*SOURCE* is an image directory (as `--images`) or a libvirt URI (as `--connect`): "
                f"anything of the form *SCHEME*`://`..., such as `{uri}`, or `{prefix}`*URI*, "
                f"or `{prefix.rstrip(':')}` alone for `{uri}`. "
                "*OPTIONS* is a comma-separated list; a comma in a value is written `\\,`."),
           ".PP",
           *_md("Every long option of `snapfs mount` is an `-o` option, named as the option without its "
                "leading dashes and with `-` written `_` (`--allow-other`: `allow_other`; "
                "`--domain` *NAME*: `domain=`*NAME*), except `--images` and `--connect`, which "
                f"*SOURCE* replaces{renamed}:")]
    for name, action in opts:
        out += [".TP", _o_option_head(name, action)]
        flag = next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])
        text = _help_text(parser, action)
        out += _lines(_escape(f"As {flag}" + (": " + text if text else ".")))
    out += [".PP", *_md("Options of **mount**(8), systemd and the kernel:"),
            ".TP", r"\fBro\fR",
            *_md("A read-only mount, which every mount is unless made writable"
                 + (f" with `{writable}`." if writable else "."))]
    if "rw" not in names:
        out += [".TP", r"\fBrw\fR",
                *_md("**mount**(8) passes `rw` for every mount not made `ro`, so it asks for nothing: "
                     "snapfs accepts and ignores it"
                     + (f"; only `{writable}` makes a mount writable." if writable else "."))]
    ignored, prefixes = mount8_ignored()
    rest = [f"`{n}`" for n in ignored if n not in ("ro", "rw")] \
        + [f"`{p}*`" if p.endswith("-") else f"`{p}`..." for p in prefixes]
    out += [".PP", *_md("These are for **mount**(8), systemd, FUSE or the kernel; snapfs accepts and "
                        "ignores them: " + ", ".join(rest) + ". "
                        "Most never reach snapfs: **mount**(8) and systemd keep `noauto`, `user`, `_netdev`, "
                        "`nofail` and `x-systemd.*` (such as `x-systemd.automount`) to themselves. "
                        "snapfs mounts are always `nosuid`, `nodev` and `noexec`."),
            ".PP", *_md("Any other option is refused with the reason, and nothing is mounted.")]
    return out


NAME_1 = "a VM's disks, every snapshot point, layer and incremental, as sparse files"


def _example(*commands: str) -> list[str]:
    return [".PP", ".RS 4", ".nf", *(r"\&" + _escape(c) for c in commands), ".fi", ".RE"]


def _head(name: str, section: int, date: str, manual: str, source: str) -> list[str]:
    """The title line, and no hyphenation (so no word, option or path is
    split), lines not stretched to the right margin."""
    version = f"snapfs {_version()}".strip()
    return [rf".\" Generated by python -m snapfs.manpage from {source}: do not edit.",
            ".nr HY 0",  # for the macros that set hyphenation again (.YS, .EE)
            f".TH {name} {section} {_quote_arg(date)} {_quote_arg(version)} {_quote_arg(manual)}",
            ".nh", ".ad l"]


def snapfs_1(parser: argparse.ArgumentParser | None = None, date: str | None = None) -> str:
    """The snapfs(1) page, from the command line parser."""
    from . import cli
    parser = parser or cli._parser()
    if date is None:
        date = _date(Path(cli.__file__), Path(__file__))
    subs = _subparsers(parser)
    out = _head("SNAPFS", 1, date, "User Commands", "snapfs/cli.py")
    out += [".SH NAME", r"snapfs \- " + _escape(NAME_1), ".SH SYNOPSIS"]
    for name, sub, _ in subs:
        out += _usage_roff(sub, f"{parser.prog} {name}")
    out += [f".SY {parser.prog}", r"\fISOURCE\fR", r"\fIMOUNTPOINT\fR", r"[\fB\-o\fR\ \fIOPTIONS\fR]", ".YS"]
    out += [".SH DESCRIPTION", *_raw_description(parser.description or "")]
    out += [".PP", *_md("**snapfs-views**(7) describes every file of a mount; \"MOUNT OPTIONS\" below, "
                        "the mount(8) and fstab form.")]
    top = _options_roff(parser, positionals=False)
    if top:
        out += [".SH OPTIONS", *top]
    out += [".SH COMMANDS"]
    for name, sub, summary in subs:
        out += [".SS " + _quote_arg(_escape(f"{parser.prog} {name}"))]
        out += _lines(_escape(sub.description or summary or ""))
        for note in _required_groups(sub):
            out += [".PP", *_md(note)]
        out += _options_roff(sub)
    out += _mount_options_roff(parser)
    out += [".SH EXAMPLES",
            ".PP", *_md("Mount an image directory, copy the disk at its newest point as a sparse file, "
                        "unmount:"),
            *_example("snapfs mount --images /srv/images /mnt/snap",
                      "cp --sparse=always /mnt/snap/vm1/vda.qcow2/chain/01-vda.raw /backup/",
                      "snapfs umount /mnt/snap"),
            ".PP", *_md("The disks of every libvirt domain, for every user, through **mount**(8):"),
            *_example("mount -t fuse.snapfs qemu:///system /mnt/vms -o allow_other"),
            ".PP", *_md("The same as a line of */etc/fstab*:"),
            *_example("qemu:///system  /mnt/vms  fuse.snapfs  allow_other,_netdev  0 0"),
            ".SH FILES",
            ".TP", r"\fIMOUNTPOINT\fB/.snapfs\-status\fR",
            *_md("Every view snapfs cannot offer, with the reason, and the latest refusal of each file; "
                 "readable by the mounting user alone (0400)."),
            ".TP", r"\fB$XDG_RUNTIME_DIR/snapfs/\fR, \fB/tmp/snapfs\-\fIUID\fB/\fR",
            *_md("The runtime directory: a private directory for each mount (the qemu-nbd sockets and pid "
                 "files; `mount.json`, which `snapfs umount` uses to stop the mount and clean up after a "
                 "crash; a libvirt mount's control socket and backup jobs), and the log file of a mount "
                 "made without `--foreground` or `--log`. `/tmp/snapfs-`*UID* serves where "
                 "`$XDG_RUNTIME_DIR` is not set to a directory of the user's, and libvirt mounts, whose "
                 "files qemu must reach."),
            ".TP", r"\fI/etc/fuse.conf\fR",
            *_md("`user_allow_other` lets users other than root mount with `--allow-other`."),
            '.SH "SEE ALSO"',
            r".BR snapfs\-views (7),",
            r".BR mount.fuse3 (8),",
            r".BR qemu\-img (1),",
            r".BR qemu\-nbd (8),",
            r".BR mount (8),",
            r".BR fstab (5),",
            r".BR fusermount3 (1)"]
    return "\n".join(out) + "\n"


# ------------------------------------------------------------ snapfs-views(7)

def pandoc(markdown: str, *options: str, source: str = GFM) -> str:
    """Roff for markdown, written by pandoc (a fragment, unless options say
    --standalone)."""
    if shutil.which("pandoc") is None:
        raise RuntimeError("pandoc not found (Debian package pandoc): run make setup")
    r = subprocess.run([*PANDOC, f"--from={source}", *options], input=markdown, capture_output=True, text=True,
                       encoding="utf-8")
    if r.returncode != 0:
        raise RuntimeError(f"pandoc failed: {r.stderr.strip()}")
    return r.stdout


def snapfs_views_7(markdown: str | None = None, date: str | None = None) -> str:
    """The snapfs-views(7) page, from docs/views.md: its title for NAME, its
    "##" headings as sections (upper case, as man pages have them), "###"
    as subsections."""
    if markdown is None:
        markdown = VIEWS_MD.read_text(encoding="utf-8")
    if date is None:
        date = _date(VIEWS_MD, Path(__file__))
    title = "what a snapfs mount shows"
    m = re.match(r"# +(.+?)\s*\n", markdown)
    if m:
        title = m.group(1)[:1].lower() + m.group(1)[1:]
        markdown = markdown[m.end():]
    markdown = re.sub(r"^## +(.+?)\s*$", lambda h: "## " + h.group(1).upper(), markdown, flags=re.M)
    page = "\n\n".join([
        "## NAME", f"snapfs-views - {title}",
        "## DESCRIPTION",
        "The files and directories of a **snapfs**(1) mount: the views, their maps, qcow2 files and "
        "extended attributes, what is left out and why, who may read what, and writable mounts.",
        markdown.strip("\n"),
        "## SEE ALSO", "**snapfs**(1), **qemu-img**(1), **qemu-nbd**(8), **nbdinfo**(1)",
    ]) + "\n"
    # hyphenate=false: no word is broken at a line's end (a code span, an
    # option, a path); adjusting=l: lines are not stretched to the margin,
    # which narrow table columns cannot be.
    return pandoc(page, "--standalone", "--shift-heading-level-by=-1",
                  "--metadata=title:SNAPFS-VIEWS", "--metadata=section:7", f"--metadata=date:{date}",
                  f"--metadata=footer:snapfs {_version()}".strip(), "--metadata=header:snapfs",
                  "--metadata=hyphenate:false", "--variable=adjusting:l", source=GFM)


# ------------------------------------------------------------------- pages

def write_pages(outdir: str | os.PathLike) -> list[Path]:
    """Write OUTDIR/man1/snapfs.1 and OUTDIR/man7/snapfs-views.7 (only those
    whose text changed); return the paths written."""
    written = []
    for path, text in ((Path(outdir, "man1", "snapfs.1"), snapfs_1()),
                       (Path(outdir, "man7", "snapfs-views.7"), snapfs_views_7())):
        try:
            if path.read_text(encoding="utf-8") == text:
                continue
        except FileNotFoundError:
            pass
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m snapfs.manpage",
                                description="Write OUTDIR/man1/snapfs.1 and OUTDIR/man7/snapfs-views.7 "
                                            "(each only if its text changed).")
    p.add_argument("outdir", metavar="OUTDIR")
    p.add_argument("-v", "--verbose", action="store_true", help="name each page written")
    args = p.parse_args(argv)
    for path in write_pages(args.outdir):
        if args.verbose:
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
