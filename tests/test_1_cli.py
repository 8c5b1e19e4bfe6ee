"""The mount(8) form of the command line: ``snapfs SOURCE MOUNTPOINT -o OPTIONS``."""

import pytest

from snapfs.cli import DEFAULT_URI, _parser, mount_form, mount_options
from snapfs.config import MountConfig


def test_every_long_mount_option_is_an_o_option():
    names = {name for name, _ in mount_options()}
    longs = {o for a in _parser().mount_parser._actions if a.help != "==SUPPRESS=="
             for o in a.option_strings if o.startswith("--")}
    # The source is SOURCE; --rw is `writable` (mount(8) passes rw for every mount);
    # --foreground would keep mount(8) waiting.
    assert {"--" + n.replace("_", "-") for n in names} | {"--rw", "--images", "--connect", "--help",
                                                           "--foreground"} == longs
    assert "writable" in names and "rw" not in names


@pytest.mark.parametrize("source, head", [
    ("/srv/images", ["mount", "--images", "/srv/images"]),
    ("images", ["mount", "--images", "images"]),
    ("qemu:///system", ["mount", "--connect", "qemu:///system"]),
    ("qemu+ssh://host/system", ["mount", "--connect", "qemu+ssh://host/system"]),
    ("libvirt", ["mount", "--connect", DEFAULT_URI]),
    ("libvirt:qemu:///session", ["mount", "--connect", "qemu:///session"]),
])
def test_source(source, head):
    assert mount_form([source, "/mnt"]) == head + ["--", "/mnt"]


def test_options_translate_and_mount8_ones_are_kept_out():
    argv = mount_form(["qemu:///system", "/mnt", "-o",
                       "rw,nosuid,nodev,noexec,noauto,user,_netdev,nofail,x-systemd.automount,"
                       "allow_other,domain=web1,domain=db,since=ck1,checkpoint=ck2,connections=2,"
                       "idle-timeout=5,cache_size=32,writable", "-o", "debug"])
    assert argv == ["mount", "--connect", "qemu:///system", "--allow-other", "--domain=web1",
                    "--domain=db", "--since=ck1", "--checkpoint=ck2", "--connections=2",
                    "--idle-timeout=5", "--cache-size=32", "--rw", "--debug", "--", "/mnt"]
    args = _parser().parse_args(argv)
    assert args.rw and args.allow_other and args.domain == ["web1", "db"] and args.idle_timeout == 5
    assert args.cache_size == 32


@pytest.mark.parametrize("argv", [
    ["--images", "/srv/images", "--cache-size", "32", "--idle-timeout", "5", "--allow-other", "/mnt"],
    ["--connect", "qemu:///system", "--domain", "a", "--since", "ck1", "--rw", "--connections", "2", "/mnt"],
])
def test_the_detached_process_gets_the_same_configuration(argv):
    config = MountConfig.from_args(_parser().parse_args(["mount", *argv]))
    assert MountConfig.from_args(_parser().parse_args(["mount", *config.argv()])) == config


def test_escaped_comma_in_a_value():
    assert mount_form(["/i", "/m", "-o", r"log=/var/log/a\,b.log"])[3] == "--log=/var/log/a,b.log"


def test_a_value_starting_with_a_dash_stays_a_value():
    argv = mount_form(["qemu:///system", "/m", "-o", "domain=-odd,since=--x"])
    args = _parser().parse_args(argv)
    assert args.domain == ["-odd"] and args.since == "--x"


@pytest.mark.parametrize("argv, why", [
    (["/i", "/m", "-o", "bogus"], "unknown mount option 'bogus'"),
    (["/i", "/m", "-o", "allow_other=1"], "takes no value"),
    (["/i", "/m", "-o", "domain"], "needs a value: domain=NAME"),
    (["/i", "/m", "-o", "ro,writable"], "contradict"),
    (["/i"], "SOURCE MOUNTPOINT"),
    (["/i", "/m", "/x"], "SOURCE MOUNTPOINT"),
    (["/i", "/m", "-x"], "unknown argument '-x'"),
    (["/i", "/m", "-o"], "-o needs OPTIONS"),
])
def test_bad_input_is_refused_with_the_reason(argv, why):
    with pytest.raises(ValueError, match=why):
        mount_form(argv)
