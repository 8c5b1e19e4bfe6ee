"""The man pages: snapfs(1) from the command line parser (argparse-manpage),
snapfs-views(7) from docs/views.md (pandoc), as snapfs/manpage.py has the tools
write them, rendered by man(1) as a reader sees them.

These need man-db, groff, pandoc and argparse-manpage (mount-helpers/setup
installs them); without them the tests fail rather than skip, so CI cannot
pass without checking the pages.
"""

import argparse
import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from snapfs import cli, manpage

ROOT = Path(__file__).resolve().parent.parent
VENV_MAN = ROOT / ".venv" / "share" / "man"
OPTION = r"(?<![\w-])(--?[A-Za-z][\w-]*)"


def _tools() -> None:
    missing = [t for t in ("man", "groff", "tbl", "pandoc") if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not found (Debian man-db, groff-base, pandoc): run make setup")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAN", "LC_", "GROFF"))}
    env.update({"LANG": "C.UTF-8", "MANWIDTH": "80", "MANPAGER": "cat", "PAGER": "cat", **extra})
    return env


def render(path: Path, **env) -> str:
    """`man --warnings -l PATH` at 80 columns, every groff warning on (-ww):
    the text, and no warning at all. A word hyphenated at a line's end is read
    whole, as a reader reads it: grotty marks that break with U+2010, never
    the ASCII hyphen of the text."""
    _tools()
    r = subprocess.run(["man", "--warnings=w", "-l", str(path)], capture_output=True, text=True,
                       env=_env(**env), timeout=60)
    assert r.returncode == 0 and r.stderr == "", f"man -l {path.name}: rc {r.returncode}\n{r.stderr}"
    return re.sub("\u2010\n *", "", r.stdout)


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    written = manpage.write_pages(out)
    page1, page7 = out / "man1" / "snapfs.1", out / "man7" / "snapfs-views.7"
    assert set(written) == {page1, page7}
    return {"1": page1, "7": page7, "1.txt": render(page1), "7.txt": render(page7)}


def helps() -> dict[str, str]:
    """What `snapfs --help` and `snapfs COMMAND --help` print, by command ("" for the top)."""
    out = {}
    for cmd in [""] + [name for name, _, _ in manpage._subparsers(cli._parser())]:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
            cli.main(([cmd] if cmd else []) + ["--help"])
        assert e.value.code == 0
        out[cmd] = buf.getvalue()
    return out


def sections(text: str) -> dict[str, str]:
    """Rendered page text by section heading (lines at column 0)."""
    out, name = {}, None
    for line in text.splitlines():
        if line and not line[0].isspace() and line.upper() == line:
            name = line.strip()
            out[name] = ""
        elif name:
            out[name] += line + "\n"
    return out


def roff_text(path: Path) -> str:
    """The page's source with hyphen escapes as the hyphens they print, and
    without font changes (\\fB and \\f[B] alike)."""
    return re.sub(r"\\f(\[[A-Z]*\]|[BIRPV])|\\&", "", path.read_text().replace(r"\-", "-"))


def has_word(text: str, word: str) -> bool:
    return re.search(r"(?<![\w-])" + re.escape(word) + r"(?![\w-])", text) is not None


def subcommand_section(text: str, name: str) -> str:
    """The rendered "snapfs NAME" subsection of COMMANDS."""
    body = sections(text)["COMMANDS"]
    m = re.search(rf"^   snapfs {name}\n(.*?)(?=^   \S|\Z)", body, re.M | re.S)
    assert m, f"no subsection 'snapfs {name}' in COMMANDS"
    return m.group(1)


# ------------------------------------------------------------------ snapfs(1)

def test_every_option_of_every_help_is_in_the_page(pages):
    """Each option string --help shows is in the page, source and rendered; each
    subcommand's options are in that subcommand's section, each as an entry."""
    src, text = roff_text(pages["1"]), pages["1.txt"]
    for cmd, out in helps().items():
        options = set(re.findall(OPTION, out))
        assert options, cmd
        for opt in options:
            assert has_word(src, opt) and has_word(text, opt), f"{opt} (snapfs {cmd} --help) not in snapfs.1"
        if cmd:
            section = subcommand_section(text, cmd)
            usage = out.split("\n\n")[0]
            # -h, --help: said once for every command, below.
            for opt in set(re.findall(OPTION, usage)) - {"-h"}:
                # An entry: the option first on its line, at the indent of the
                # command's entries (the section's 7, then the list's 7).
                assert re.search(rf"^ {{14}}(\S.*, )?{re.escape(opt)}\b", section, re.M), \
                    f"no entry for {opt} under snapfs {cmd}"
    description = " ".join(sections(text)["DESCRIPTION"].split())
    assert "Each command, and snapfs itself, takes -h, --help" in description


def test_hidden_options_are_left_out(pages):
    hidden = [o for _, sub, _ in manpage._subparsers(cli._parser()) for a in sub._actions
              if a.help == argparse.SUPPRESS for o in a.option_strings]
    assert hidden  # --debug-fuse, --ready-fd
    for opt in hidden:
        assert not has_word(roff_text(pages["1"]), opt), opt


def test_synopsis_and_description_come_from_the_parser(pages):
    parser = cli._parser()
    found = sections(pages["1.txt"])
    synopsis = " ".join(found["SYNOPSIS"].split())
    for _name, sub, _ in manpage._subparsers(parser):
        usage = " ".join(sub.format_usage().split()).removeprefix("usage: ")
        assert usage in synopsis
    assert "snapfs SOURCE MOUNTPOINT [-o OPTIONS]" in synopsis
    # Word for word, however man fills the lines.
    assert " ".join(parser.description.split()) in " ".join(found["DESCRIPTION"].split())
    for name, sub, summary in manpage._subparsers(parser):
        said = " ".join((sub.description or summary).split())
        assert said in " ".join(subcommand_section(pages["1.txt"], name).split())


def test_every_o_option_is_listed_in_mount_options(pages):
    text = sections(pages["1.txt"])["MOUNT OPTIONS"]
    names = manpage.mount_options()
    assert {"allow_other", "domain", "connections"} <= {n for n, _ in names}
    for name, action in names:
        head = name if action.nargs == 0 else f"{name}={action.metavar}"
        assert re.search(rf"^       {re.escape(head)}\b", text, re.M), f"-o {head} not in MOUNT OPTIONS"
        flag = next(o for o in action.option_strings if o.startswith("--"))
        assert has_word(text, flag)
    ignored, prefixes = manpage.mount8_ignored()
    for word in ["ro", "rw", "noauto", "user", "_netdev", "x-systemd.automount", *ignored, *prefixes]:
        assert word in text, f"{word} not in MOUNT OPTIONS"


def test_o_options_follow_the_long_options_when_the_cli_names_none():
    """Without cli.mount_options(): each long option, dashes dropped, - as _."""
    names = dict(manpage.mount_options(cli._parser()))
    assert names["allow_other"].dest == "allow_other"
    assert names["rw"].dest == "rw" and names["domain"].metavar == "NAME"
    assert not {"debug_fuse", "ready_fd", "help", "mountpoint"} & set(names)


def test_files_and_see_also(pages):
    found = sections(pages["1.txt"])
    assert "MOUNTPOINT/.snapfs-status" in found["FILES"] and "$XDG_RUNTIME_DIR/snapfs/" in found["FILES"]
    see = " ".join(found["SEE ALSO"].split())
    for ref in ("snapfs-views(7)", "mount.fuse3(8)", "qemu-img(1)"):
        assert ref in see


# ------------------------------------------------------------ snapfs-views(7)

def test_views_page_has_every_heading_table_and_bullet_of_views_md(pages):
    md = manpage.VIEWS_MD.read_text()
    src, text = pages["7"].read_text(), pages["7.txt"]
    found = sections(text)
    for heading in re.findall(r"^## (.+)$", md, re.M):
        assert heading.upper() in found, heading
    rendered = " ".join(text.split())
    for heading in re.findall(r"^### (.+)$", md, re.M):
        assert re.search(rf"^   {re.escape(heading)}$", text, re.M), heading
    assert src.count(".TS\n") == len(re.findall(r"^\|[- |]+\|$", md, re.M))
    assert src.count(r".IP \[bu]") == len(re.findall(r"^\s*- ", md, re.M))
    assert src.startswith("'\\\" t\n")  # man runs tbl
    # Markup gone, text kept: a table cell, code, bold, a link's text.
    for words in ("(QFI\\xfb)", "user.snapfs.backupmode", "Backing files. A layer's .qcow2", "see libvirt.md",
                  "qemu-img create -b PREVIOUS -F qcow2"):
        assert words in rendered, words
    assert "**" not in rendered and "`" not in rendered and "](" not in rendered


def test_pages_render_in_plain_ascii_too(pages):
    for page in ("1", "7"):
        render(pages[page], LANG="C")


# ----------------------------------------------------------------- converter

def test_roff_specials_are_escaped(tmp_path):
    """Markdown that roff would misread (backslashes, hyphens, a line starting
    with "." or "'") reaches the reader as the text it is."""
    md = ("## A heading\n\n"
          "Text with a backslash \\ and `C:\\dir\\x` and `--an-option`,\n"
          ".snapfs-status at the start of a line,\n"
          "'quoted' at the start of one, **bold `code`**, *it*, [a link](x.md) \u2014 done\u2026\n\n"
          "- a bullet\n  .dot continued\n\n"
          "  a second paragraph\n"
          "  - nested\n"
          "- second\n\n"
          "| a | b |\n| --- | --- |\n| `.x` | 'y |\n")
    roff = manpage.snapfs_views_7(md, date="2024-01-01")
    # Code in pandoc's code font (bold on a terminal), hyphens and backslashes kept.
    assert r"\f[V]--an-option\f[R]" in roff and r"\f[V]C:\[rs]dir\[rs]x\f[R]" in roff
    # No line of the text became a request.
    assert not [line for line in roff.split("\n") if re.match(r"[.'](snapfs|dot|quoted|x|y)\b", line)]
    page = tmp_path / "t.7"
    page.write_text(roff)
    text = " ".join(render(page).split())
    for words in ("A HEADING", "a backslash \\ and C:\\dir\\x and --an-option",
                  ".snapfs-status at the start", "'quoted' at the start", "bold code, it, a link",
                  "\u2014 done...", "\u2022 a bullet .dot continued a second paragraph \u2022 nested",
                  "\u2022 second", ".x 'y"):
        assert words in text, words


# ---------------------------------------------------------------- install

def test_module_writes_both_pages_once(tmp_path):
    cmd = [sys.executable, "-m", "snapfs.manpage", "--verbose", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    assert first == [str(tmp_path / "man1" / "snapfs.1"), str(tmp_path / "man7" / "snapfs-views.7")]
    assert subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout == ""


def test_make_setup_installed_the_pages_for_the_venv():
    """man finds the pages for .venv/bin on PATH, and they are current."""
    _tools()
    for rel, text in (("man1/snapfs.1", manpage.snapfs_1()), ("man7/snapfs-views.7", manpage.snapfs_views_7())):
        installed = VENV_MAN / rel
        if not installed.exists():
            pytest.fail(f"{installed} missing: run make setup")
        if installed.read_text() != text:
            pytest.fail(f"{installed} is out of date: run make setup")
    env = _env(PATH=f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin")
    for name, rel in (("snapfs", "man1/snapfs.1"), ("snapfs-views", "man7/snapfs-views.7")):
        r = subprocess.run(["man", "-aw", name], capture_output=True, text=True, env=env, timeout=60)
        assert str(VENV_MAN / rel) in r.stdout.split(), f"man -aw {name}: {r.stdout}{r.stderr}"
