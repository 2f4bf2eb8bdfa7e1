#!/usr/bin/env python3
"""facepipe offline test lab: real systemd hosts without an image registry.

Base root filesystems are built once per Debian release with debootstrap and
cached under /var/cache/facepipe-lab/<release>/rootfs.  A lab is a Linux
bridge with NAT (nftables table ``inet fplab_<lab>``) and, per host, a copy of
a base image booted with ``systemd-nspawn -b`` inside its own network
namespace, attached to the bridge by a veth pair.  Ansible reaches the hosts
over SSH as root with a key generated per lab.

Run as root.  Python standard library only.  See README.md next to this file.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict, TypeGuard

CACHE_DIR = Path(os.environ.get("FACEPIPE_LAB_CACHE", "/var/cache/facepipe-lab"))
STATE_DIR = Path(os.environ.get("FACEPIPE_LAB_STATE", "/var/lib/facepipe-lab"))
MIRROR = os.environ.get("FACEPIPE_LAB_MIRROR", "http://deb.debian.org/debian")
SECURITY_MIRROR = os.environ.get("FACEPIPE_LAB_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
RELEASES = ("bookworm", "trixie")
IMAGE_MAX_AGE = 7 * 24 * 3600
IMAGE_FORMAT = 1  # bump when the image recipe changes: cached images get rebuilt
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "openssh-server",
    "python3",
    "python3-apt",
    "ca-certificates",
    "iproute2",
    "iputils-ping",
    "netbase",
    "procps",
    "sudo",
    "curl",
]
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
HOST_FIRST_OCTET = 11
SSH_OPTS = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "BatchMode=yes",
    "-o",
    "ConnectTimeout=5",
]


class ImageStamp(TypedDict):
    """<release>/<version>/stamp.json: how an image was built (read with .get: older stamps lack keys)."""

    release: str
    built: int  # time.time() when the build finished; the version directory is named after it
    format: int  # IMAGE_FORMAT of the recipe
    packages: list[str]
    mirror: str
    seconds: float  # build duration


class Host(TypedDict):
    """A host in hosts.json. Plain dicts at run time, so a rewrite of the file keeps the order of
    its keys and any key this version does not know."""

    name: str
    release: str
    groups: list[str]
    address: str
    netns: str
    veth: str  # bridge side of the veth pair
    peer: str  # container side, renamed eth0 in the netns
    cut: bool
    image: NotRequired[str]  # the image rootfs its overlay is layered on ("" for a full copy); set at boot
    powered_off: NotRequired[bool]  # set by poweroff / poweron
    blocked: NotRequired[list[int]]  # gateway TCP ports dropped for it (block / unblock)


@dataclass(frozen=True)
class HostSpec:
    """A host as asked for with --host NAME:RELEASE[:GROUP,...]."""

    name: str
    release: str
    groups: tuple[str, ...]


class HostRef(TypedDict):
    """A host `down` knows only by its directory (its hosts.json entry is lost)."""

    name: str
    netns: NotRequired[str]
    veth: NotRequired[str]


class LabState(TypedDict):
    """hosts.json; `up` prints it, `status` prints it with run-time facts added."""

    lab: str
    subnet: str
    bridge: str
    gateway: str
    ssh_key: str
    hosts: list[Host]


def log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


class LabError(Exception):
    """A failure to report as `lab: error: <message>` with exit status 1 (done once, in main)."""


def run(cmd: list[str], check: bool = True, capture: bool = False, **kw: Any) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {"text": True}
    if capture:
        kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    kwargs.update(kw)
    proc = subprocess.run(cmd, check=False, **kwargs)
    if check and proc.returncode != 0:
        err = (proc.stderr or "").strip() if capture else ""
        raise LabError(f"command failed ({proc.returncode}): {' '.join(cmd)} {err}")
    return proc


def ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode == 0


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------- images


def image_dir(release: str) -> Path:
    """The current image version of a release (resolved, so hosts keep using the version they
    booted from while a refresh installs a new one)."""
    return (CACHE_DIR / release / "current").resolve()


def image_root(release: str) -> Path:
    return image_dir(release) / "rootfs"


def image_stamp(release: str) -> ImageStamp | None:
    try:
        stamp: ImageStamp = json.loads((image_dir(release) / "stamp.json").read_text())
        return stamp
    except (OSError, ValueError):
        return None


def migrate_image_layout(release: str) -> None:
    """Move a first-layout image (<release>/rootfs + stamp.json) into a version directory."""
    rdir = CACHE_DIR / release
    if (rdir / "rootfs").is_dir() and not (rdir / "current").is_symlink():
        try:
            built = json.loads((rdir / "stamp.json").read_text())["built"]
        except (OSError, ValueError, KeyError):
            built = int(time.time())
        version = rdir / time.strftime("%Y%m%dT%H%M%S", time.gmtime(built))
        version.mkdir()
        (rdir / "rootfs").rename(version / "rootfs")
        if (rdir / "stamp.json").exists():
            (rdir / "stamp.json").rename(version / "stamp.json")
        (rdir / "current").symlink_to(version.name)


def images_in_use() -> set[str]:
    used: set[str] = set()
    for hosts_json in STATE_DIR.glob("*/hosts.json"):
        with contextlib.suppress(OSError, ValueError):
            used.update(h.get("image", "") for h in json.loads(hosts_json.read_text())["hosts"])
    return used


def prune_images(release: str) -> None:
    """Delete image versions that are neither current nor the lower layer of a lab host."""
    rdir = CACHE_DIR / release
    current = (rdir / "current").resolve()
    used = images_in_use()
    for version in rdir.iterdir():
        if version.is_symlink() or not version.is_dir() or version == current:
            continue
        if str(version / "rootfs") in used:
            log(f"image {version} still used by a lab host; kept")
            continue
        shutil.rmtree(version)


def image_fresh(release: str) -> bool:
    stamp = image_stamp(release)
    return bool(
        stamp
        and stamp.get("format") == IMAGE_FORMAT
        and time.time() - stamp.get("built", 0) < IMAGE_MAX_AGE
        and image_root(release).joinpath("usr/lib/systemd/systemd").exists()
    )


def sources_deb822(release: str) -> str:
    keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
    return (
        f"Types: deb\nURIs: {MIRROR}\nSuites: {release} {release}-updates\n"
        f"Components: main\nSigned-By: {keyring}\n\n"
        f"Types: deb\nURIs: {SECURITY_MIRROR}\nSuites: {release}-security\n"
        f"Components: main\nSigned-By: {keyring}\n"
    )


def build_image(release: str) -> None:
    rdir = CACHE_DIR / release
    rdir.mkdir(parents=True, exist_ok=True)
    for stale in CACHE_DIR.glob(f".{release}.build-*"):
        shutil.rmtree(stale, ignore_errors=True)  # interrupted earlier builds (we hold the lock)
    tmp = CACHE_DIR / f".{release}.build-{os.getpid()}"
    root = tmp / "rootfs"
    root.mkdir(parents=True)
    started = time.monotonic()
    log(f"debootstrap {release} into {root}")
    run(
        [
            "debootstrap",
            "--variant=minbase",
            "--components=main",
            "--include=" + ",".join(PACKAGES),
            release,
            str(root),
            MIRROR,
        ],
        stdout=sys.stderr,
    )
    # apt sources: the release, its updates and security (no backports: roles add what they need)
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(sources_deb822(release))
    (root / "etc/apt/apt.conf.d/90facepipe-lab").write_text(
        'APT::Install-Recommends "false";\nAcquire::Languages "none";\n'
    )
    # Test setup: trust the controller's CA bundle (the network may intercept TLS).
    ca = root / "usr/local/share/ca-certificates/controller-ca.crt"
    ca.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile("/etc/ssl/certs/ca-certificates.crt", ca)
    run(["chroot", str(root), "update-ca-certificates"], stdout=sys.stderr)
    # Lean: drop caches and docs; per-instance identity is created at copy time.
    run(["chroot", str(root), "apt-get", "clean"])
    for sub in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/info"):
        p = root / sub
        if p.exists():
            for child in p.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
    for key in (root / "etc/ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc/machine-id").write_text("")
    (root / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    # No consoles, no periodic apt jobs racing the tests.
    wants = root / "etc/systemd/system"
    for unit in (
        "getty@tty1.service",
        "console-getty.service",
        "apt-daily.timer",
        "apt-daily-upgrade.timer",
        "e2scrub_all.timer",
        "fstrim.timer",
    ):
        link = wants / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    run(["chroot", str(root), "systemctl", "enable", "ssh.service"], stdout=sys.stderr)
    (root / "etc/ssh/sshd_config.d").mkdir(exist_ok=True)
    (root / "etc/ssh/sshd_config.d/10-facepipe-lab.conf").write_text(
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
    )
    stamp: ImageStamp = {
        "release": release,
        "built": int(time.time()),
        "format": IMAGE_FORMAT,
        "packages": PACKAGES,
        "mirror": MIRROR,
        "seconds": round(time.monotonic() - started, 1),
    }
    (tmp / "stamp.json").write_text(json.dumps(stamp, indent=2) + "\n")
    # Install: move the finished tree into a new version directory, then switch the
    # `current` symlink atomically (rename over it); old versions go once no host uses them.
    version = time.strftime("%Y%m%dT%H%M%S", time.gmtime(stamp["built"]))
    tmp.rename(rdir / version)
    link = rdir / f".current-{os.getpid()}"
    link.unlink(missing_ok=True)
    link.symlink_to(version)
    link.replace(rdir / "current")
    prune_images(release)
    log(f"image {release} built in {stamp['seconds']} s")


def ensure_images(releases: list[str], refresh: bool = False) -> None:
    for release in releases:
        if release not in RELEASES:
            raise LabError(f"unknown release {release!r} (known: {', '.join(RELEASES)})")
        with locked(CACHE_DIR / f".{release}.lock"):
            migrate_image_layout(release)
            if refresh or not image_fresh(release):
                build_image(release)
            else:
                log(f"image {release} is fresh ({image_root(release)})")


def cmd_images(args: argparse.Namespace) -> None:
    ensure_images(args.release or list(RELEASES), args.refresh)
    for release in args.release or RELEASES:
        print(
            json.dumps(
                {
                    "release": release,
                    "path": str(image_root(release)),
                    "stamp": image_stamp(release),
                }
            )
        )


# ---------------------------------------------------------------- lab state


def lab_dir(lab: str) -> Path:
    return STATE_DIR / lab


def lab_lock(lab: str) -> Path:
    return STATE_DIR / f".{lab}.lock"


def load_state(lab: str) -> LabState | None:
    try:
        state: LabState = json.loads((lab_dir(lab) / "hosts.json").read_text())
        return state
    except (OSError, ValueError):
        return None


def save_state(state: LabState) -> None:
    path = lab_dir(state["lab"]) / "hosts.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def short_hash(*parts: str) -> str:
    return hashlib.sha1("/".join(parts).encode()).hexdigest()[:10]


def veth_names(lab: str, host: str) -> tuple[str, str]:
    h = short_hash(lab, host)
    return f"fpv{h}", f"fpc{h}"  # 13 chars: bridge side, container side (renamed eth0 inside)


def netns_name(lab: str, host: str) -> str:
    return f"fp-{lab}-{host}"


def nft_table(lab: str) -> str:
    return "fplab_" + re.sub(r"[^A-Za-z0-9_]", "_", lab)


def pid_alive(pid: int | None) -> TypeGuard[int]:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie or a recycled pid is not our nspawn
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return status != "Z" and any(b"systemd-nspawn" in c for c in cmdline[:1])


def host_pid(lab: str, host: str) -> int | None:
    try:
        return int((lab_dir(lab) / host / "nspawn.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def host_running(lab: str, host: str) -> bool:
    return pid_alive(host_pid(lab, host))


# ---------------------------------------------------------------- network


def link_exists(name: str) -> bool:
    return ok(["ip", "link", "show", "dev", name])


def netns_exists(name: str) -> bool:
    return Path(f"/run/netns/{name}").exists()


def ensure_bridge(lab: str, bridge: str, net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> None:
    gw = f"{net.network_address + 1}/{net.prefixlen}"
    if not link_exists(bridge):
        run(["ip", "link", "add", "name", bridge, "type", "bridge"])
    addrs = run(["ip", "-4", "-o", "addr", "show", "dev", bridge], capture=True).stdout
    if gw.split("/")[0] + "/" not in addrs:
        run(["ip", "addr", "add", gw, "dev", bridge])
    run(["ip", "link", "set", bridge, "up"])
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
    table = nft_table(lab)
    ruleset = f"""
table inet {table} {{}}
delete table inet {table}
table inet {table} {{
    set cut_addrs {{ type ipv4_addr; }}
    set blocked {{ type ipv4_addr . inet_service; }}
    chain input {{
        type filter hook input priority filter - 5; policy accept;
        ip saddr . tcp dport @blocked drop
    }}
    chain forward {{
        type filter hook forward priority filter - 5; policy accept;
        ip saddr @cut_addrs drop
        ip daddr @cut_addrs drop
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr {net} ip daddr != {net} masquerade
    }}
}}
table bridge {table} {{}}
delete table bridge {table}
table bridge {table} {{
    set cut_ports {{ type ifname; }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname @cut_ports drop
        oifname @cut_ports drop
    }}
}}
"""
    cut = cut_state(lab)
    blocked = blocked_state(lab)
    run(["nft", "-f", "-"], input=ruleset)
    iptables_forward(lab, bridge, add=True)
    # restore cuts and blocked ports across re-runs of up
    for addr, veth in cut.values():
        apply_cut(lab, addr, veth, True)
    for addr, ports in blocked.values():
        for port in ports:
            apply_block(lab, addr, port, True)


def cut_state(lab: str) -> dict[str, tuple[str, str]]:
    """name -> (address, veth) of the lab's cut hosts."""
    state = load_state(lab)
    hosts = state.get("hosts", []) if state else []
    return {h["name"]: (h["address"], h["veth"]) for h in hosts if h.get("cut")}


def apply_cut(lab: str, address: str, veth: str, cut: bool) -> None:
    table = nft_table(lab)
    verb = "add" if cut else "delete"
    for fam, setname, elem in (
        ("inet", "cut_addrs", address),
        ("bridge", "cut_ports", f'"{veth}"'),
    ):
        proc = run(
            ["nft", verb, "element", fam, table, setname, f"{{ {elem} }}"],
            check=False,
            capture=True,
        )
        if proc.returncode != 0 and cut:
            raise LabError(f"nft {verb} element failed: {proc.stderr.strip()}")


def blocked_state(lab: str) -> dict[str, tuple[str, list[int]]]:
    """name -> (address, blocked gateway ports) of the lab's hosts with blocked ports."""
    state = load_state(lab)
    hosts = state.get("hosts", []) if state else []
    return {h["name"]: (h["address"], h.get("blocked", [])) for h in hosts if h.get("blocked")}


def apply_block(lab: str, address: str, port: int, block: bool) -> None:
    """Drop (silently, like an unreachable service) a host's TCP traffic to a gateway port."""
    verb = "add" if block else "delete"
    elem = f"{{ {address} . {port} }}"
    proc = run(["nft", verb, "element", "inet", nft_table(lab), "blocked", elem], check=False, capture=True)
    if proc.returncode != 0 and block:
        raise LabError(f"nft {verb} element failed: {proc.stderr.strip()}")


def iptables_forward(lab: str, bridge: str, add: bool) -> None:
    """Docker and similar set the iptables FORWARD policy to DROP, which our nft table cannot
    override: when that is the case, accept the lab bridge's traffic there too (tagged with a
    comment so down removes exactly these rules)."""
    if not shutil.which("iptables"):
        return
    rules = [["-i", bridge], ["-o", bridge]]
    tag = ["-m", "comment", "--comment", nft_table(lab)]
    for r in rules:
        present = ok(["iptables", "-C", "FORWARD", *r, *tag, "-j", "ACCEPT"])
        if add and not present:
            policy = run(["iptables", "-S", "FORWARD"], check=False, capture=True).stdout
            if "-P FORWARD DROP" in policy:
                run(["iptables", "-I", "FORWARD", *r, *tag, "-j", "ACCEPT"], check=False)
        elif not add:
            while ok(["iptables", "-D", "FORWARD", *r, *tag, "-j", "ACCEPT"]):
                pass


def teardown_network(lab: str, bridge: str | None) -> None:
    table = nft_table(lab)
    if bridge:
        iptables_forward(lab, bridge, add=False)
    for fam in ("inet", "bridge"):
        run(["nft", "delete", "table", fam, table], check=False, capture=True)
    if bridge and link_exists(bridge):
        run(["ip", "link", "del", bridge], check=False)


# ---------------------------------------------------------------- hosts


def ssh_cmd(state: LabState, address: str, *remote: str, tty: bool = False) -> list[str]:
    cmd = ["ssh", *SSH_OPTS, "-i", state["ssh_key"], "-l", "root"]
    if tty:
        cmd.append("-t")
    return [*cmd, address, *remote]


def ensure_key(lab: str) -> Path:
    key = lab_dir(lab) / "id_ed25519"
    if not key.exists():
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"facepipe-lab-{lab}",
                "-f",
                str(key),
            ]
        )
    return key


def write_identity(root: Path, name: str, address: str, all_hosts: list[Host], gateway: str) -> None:
    (root / "etc/hostname").write_text(name + "\n")
    lines = [
        "127.0.0.1\tlocalhost",
        f"127.0.1.1\t{name}",
        f"{gateway}\tgateway",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    lines += [f"{h['address']}\t{h['name']}" for h in all_hosts if h["name"] != name]
    (root / "etc/hosts").write_text("\n".join(lines) + "\n")


def resolv_conf() -> str:
    """The controller's resolv.conf, unless its resolvers are loopback-only."""
    text = Path("/etc/resolv.conf").read_text()
    servers = re.findall(r"^\s*nameserver\s+(\S+)", text, re.M)
    good = [s for s in servers if not ipaddress.ip_address(s).is_loopback]
    if not good:
        upstream = os.environ.get("FACEPIPE_LAB_DNS")
        if not upstream:
            raise LabError("controller resolver is loopback-only; set FACEPIPE_LAB_DNS to an upstream resolver")
        good = upstream.split(",")
    return "".join(f"nameserver {s}\n" for s in good if ":" not in s) + "options timeout:2 attempts:3\n"


def prepare_rootfs(lab: str, host: Host, state: LabState) -> Path:
    hdir = lab_dir(lab) / host["name"]
    root = hdir / "rootfs"
    remove_rootfs(hdir)
    hdir.mkdir(parents=True, exist_ok=True)
    lower = image_root(host["release"])
    host["image"] = str(lower)
    # The image is the read-only lower layer of an overlay: nothing to copy, and only the
    # host's changes (upper) take space. Falls back to a full copy where overlayfs fails.
    for sub in ("rootfs", "upper", "work"):
        (hdir / sub).mkdir()
    opts = f"lowerdir={lower},upperdir={hdir / 'upper'},workdir={hdir / 'work'}"
    if not ok(["mount", "-t", "overlay", "overlay", "-o", opts, str(root)]):
        log(f"{host['name']}: overlay mount failed, copying the image instead")
        host["image"] = ""
        root.rmdir()
        run(["cp", "-a", "--reflink=auto", str(lower), str(root)])
    (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
    # The image ships without apt lists, but their directory carries the build time, which
    # `apt: cache_valid_time` would take for a fresh cache: date it back so the first apt task
    # of a role fetches the lists, as on any host whose cache is old.
    os.utime(root / "var/lib/apt/lists", (0, 0))
    for kind in ("ed25519", "ecdsa"):  # per-host host keys (RSA skipped: slow, unneeded)
        key = root / f"etc/ssh/ssh_host_{kind}_key"
        run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", f"root@{host['name']}", "-f", str(key)])
    (root / "etc/ssh/sshd_config.d/20-facepipe-lab-hostkeys.conf").write_text(
        "HostKey /etc/ssh/ssh_host_ed25519_key\nHostKey /etc/ssh/ssh_host_ecdsa_key\n"
    )
    ssh_dir = root / "root/.ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    pub = Path(state["ssh_key"] + ".pub").read_text()
    (ssh_dir / "authorized_keys").write_text(pub)
    os.chmod(ssh_dir / "authorized_keys", 0o600)
    resolv = root / "etc/resolv.conf"
    resolv.unlink(missing_ok=True)
    resolv.write_text(resolv_conf())
    # eth0 is configured from the outside (static address in the netns)
    return root


def ensure_netns(lab: str, host: Host, state: LabState) -> None:
    ns = host["netns"]
    veth, peer = host["veth"], host["peer"]
    net = ipaddress.ip_network(state["subnet"])
    if not netns_exists(ns):
        run(["ip", "netns", "add", ns])
    if not ok(["ip", "-n", ns, "link", "show", "dev", "eth0"]):
        if link_exists(veth):
            run(["ip", "link", "del", veth])
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", peer])
        run(["ip", "link", "set", peer, "netns", ns])
        run(["ip", "-n", ns, "link", "set", peer, "name", "eth0"])
    run(["ip", "link", "set", veth, "master", state["bridge"]])
    run(["ip", "link", "set", veth, "up"])
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    addr = f"{host['address']}/{net.prefixlen}"
    if addr not in run(["ip", "-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"], capture=True).stdout:
        run(["ip", "-n", ns, "addr", "add", addr, "dev", "eth0"])
    run(["ip", "-n", ns, "route", "replace", "default", "via", state["gateway"]])


def boot(lab: str, host: Host) -> int:
    hdir = lab_dir(lab) / host["name"]
    logf = open(hdir / "console.log", "ab")
    cmd = [
        "systemd-nspawn",
        "--quiet",
        "-D",
        str(hdir / "rootfs"),
        "--boot",
        "--register=no",
        "--keep-unit",
        f"--machine={host['name']}",
        f"--network-namespace-path=/run/netns/{host['netns']}",
        # As on a real host, root may manage the network of its own namespace (nftables rules of
        # facepipe_firewall); nspawn grants it only with --private-network, not with a given netns.
        "--capability=CAP_NET_ADMIN",
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=read-only",
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=logf,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )
    (hdir / "nspawn.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def wait_ready(state: LabState, host: Host, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    addr = host["address"]
    while time.monotonic() < deadline:
        if not host_running(state["lab"], host["name"]):
            raise LabError(f"{host['name']}: nspawn exited; see {lab_dir(state['lab']) / host['name'] / 'console.log'}")
        try:
            with socket.create_connection((addr, 22), timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        raise LabError(f"{host['name']}: ssh port not reachable at {addr} after {timeout}s")
    while time.monotonic() < deadline:
        left = max(5, int(deadline - time.monotonic()))
        proc = run(
            ssh_cmd(state, addr, f"timeout {left} systemctl is-system-running --wait"),
            check=False,
            capture=True,
        )
        status = proc.stdout.strip()
        if status in ("running", "degraded"):
            if status == "degraded":
                failed = run(
                    ssh_cmd(state, addr, "systemctl --failed --no-legend --plain"),
                    check=False,
                    capture=True,
                ).stdout.strip()
                log(f"{host['name']}: degraded; failed units: {failed}")
            return status
        time.sleep(1)
    raise LabError(f"{host['name']}: system did not reach running state in {timeout}s")


def remove_rootfs(hdir: Path) -> None:
    """Unmount a host's overlay root and delete its layers (never the image below)."""
    root = hdir / "rootfs"
    if os.path.ismount(root):
        if not ok(["umount", str(root)]):
            run(["umount", "--lazy", str(root)], check=False)
    if os.path.ismount(root):
        raise LabError(f"{root} is still mounted; refusing to delete below it")
    for sub in ("rootfs", "upper", "work"):
        if (hdir / sub).exists():
            shutil.rmtree(hdir / sub)


def stop_host(lab: str, host: Host | HostRef, timeout: float = 30) -> None:
    pid = host_pid(lab, host["name"])
    if pid_alive(pid):
        # SIGTERM makes nspawn ask the container's systemd to power off cleanly.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.3)
        log(f"{host['name']}: stopped in {time.monotonic() - deadline + timeout:.1f}s")
        if pid_alive(pid):
            log(f"{host['name']}: nspawn {pid} did not stop, killing its process group")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            time.sleep(0.5)
    ns = host.get("netns") or netns_name(lab, host["name"])
    if netns_exists(ns):
        # any process still in the netns is a leftover of this host
        pids = run(["ip", "netns", "pids", ns], check=False, capture=True).stdout.split()
        for p in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(p), signal.SIGKILL)
        run(["ip", "netns", "del", ns], check=False)
    veth = host.get("veth") or veth_names(lab, host["name"])[0]
    if link_exists(veth):
        run(["ip", "link", "del", veth], check=False, capture=True)
    hdir = lab_dir(lab) / host["name"]
    (hdir / "nspawn.pid").unlink(missing_ok=True)
    root = hdir / "rootfs"
    if os.path.ismount(root) and not ok(["umount", str(root)]):
        run(["umount", "--lazy", str(root)], check=False)


def kill_host(lab: str, host: Host) -> None:
    """Every process of a host dies at once (SIGKILL): no shutdown, no unit stops, no unmount."""
    pid = host_pid(lab, host["name"])
    ns = host.get("netns") or netns_name(lab, host["name"])
    pids = run(["ip", "netns", "pids", ns], check=False, capture=True).stdout.split() if netns_exists(ns) else []
    for p in pids:  # the container's init among them: its PID namespace dies with it
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid_alive(pid):
        raise LabError(f"{host['name']}: nspawn {pid} survived SIGKILL")


def mount_rootfs(lab: str, host: Host) -> Path:
    """Mount a host's existing overlay again (its disk as the power cut left it)."""
    hdir = lab_dir(lab) / host["name"]
    root = hdir / "rootfs"
    if host.get("image") and not os.path.ismount(root):
        opts = f"lowerdir={host['image']},upperdir={hdir / 'upper'},workdir={hdir / 'work'}"
        run(["mount", "-t", "overlay", "overlay", "-o", opts, str(root)])
    return root


def cmd_poweroff(args: argparse.Namespace) -> None:
    with locked(lab_lock(args.lab)):
        state, h = get_host(args)
        if not host_running(args.lab, h["name"]):
            raise LabError(f"{h['name']}: not running")
        t0 = time.monotonic()
        kill_host(args.lab, h)
        stop_host(args.lab, h)  # network and mount leftovers; the disk (upper layer) stays
        h["powered_off"] = True
        save_state(state)
    log(f"{h['name']}: powered off hard in {time.monotonic() - t0:.1f}s (every process SIGKILLed)")


def cmd_poweron(args: argparse.Namespace) -> None:
    with locked(lab_lock(args.lab)):
        state, h = get_host(args)
        if host_running(args.lab, h["name"]):
            raise LabError(f"{h['name']}: already running")
        if not (lab_dir(args.lab) / h["name"] / "upper").is_dir() and h.get("image"):
            raise LabError(f"{h['name']}: no disk to boot; use up")
        mount_rootfs(args.lab, h)
        ensure_netns(args.lab, h, state)
        if h.get("cut"):
            apply_cut(args.lab, h["address"], h["veth"], True)
        pid = boot(args.lab, h)
        h["powered_off"] = False
        save_state(state)
        log(f"{h['name']}: booting from its disk (nspawn pid {pid})")
        status = wait_ready(state, h, timeout=args.timeout)
    log(f"{h['name']}: {status}")


def cmd_block(args: argparse.Namespace, block: bool = True) -> None:
    with locked(lab_lock(args.lab)):
        state, h = get_host(args)
        apply_block(args.lab, h["address"], args.port, block)
        ports = set(h.get("blocked", []))
        ports = ports | {args.port} if block else ports - {args.port}
        h["blocked"] = sorted(ports)
        save_state(state)
    gateway = state["gateway"]
    log(f"{h['name']}: {gateway}:{args.port} {'blocked (dropped silently)' if block else 'reachable again'}")


def parse_host(spec: str) -> HostSpec:
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise LabError(f"bad --host {spec!r}: expected NAME:RELEASE[:GROUP,...]")
    name, release = parts[0], parts[1]
    if not NAME_RE.match(name):
        raise LabError(f"bad host name {name!r}")
    if release not in RELEASES:
        raise LabError(f"bad release {release!r} for {name}")
    groups = tuple(g for g in (parts[2].split(",") if len(parts) == 3 else []) if g)
    return HostSpec(name, release, groups)


def cmd_up(args: argparse.Namespace) -> None:
    lab = args.lab
    if not NAME_RE.match(lab):
        raise LabError(f"bad lab name {lab!r}")
    if len(args.bridge) > 15:
        raise LabError("bridge name longer than 15 characters")
    net = ipaddress.ip_network(args.subnet)
    wanted = [parse_host(s) for s in args.host]
    if len({w.name for w in wanted}) != len(wanted):
        raise LabError("duplicate host names")
    ensure_images(sorted({w.release for w in wanted}))
    with locked(lab_lock(lab)):
        lab_dir(lab).mkdir(parents=True, exist_ok=True)
        saved = load_state(lab)
        if saved and (saved.get("subnet") != str(net) or saved.get("bridge") != args.bridge):
            raise LabError(
                f"lab {lab} exists with subnet {saved.get('subnet')} bridge {saved.get('bridge')}; run down first"
            )
        state: LabState = {
            "lab": lab,
            "subnet": str(net),
            "bridge": args.bridge,
            "gateway": str(net.network_address + 1),
            "ssh_key": str(ensure_key(lab)),
            "hosts": saved.get("hosts", []) if saved else [],
        }
        if saved:  # an existing file keeps its key order (and any key this version does not know)
            saved.update(state)
            state = saved
        known = {h["name"]: h for h in state["hosts"]}
        used = {h["address"] for h in known.values()}
        free = (str(net.network_address + i) for i in range(HOST_FIRST_OCTET, net.num_addresses - 1))
        hosts: list[Host] = []
        for w in wanted:
            netns = netns_name(lab, w.name)
            veth, peer = veth_names(lab, w.name)
            old = known.pop(w.name, None)
            h: Host
            if old and old["release"] != w.release:
                log(f"{w.name}: release changed, recreating")
                stop_host(lab, old)
                # recreated at its old address; key order as before (address first)
                h = {
                    "address": old["address"],
                    "name": w.name,
                    "release": w.release,
                    "groups": list(w.groups),
                    "netns": netns,
                    "veth": veth,
                    "peer": peer,
                    "cut": False,
                }
            elif old:  # kept, with what --host asks for now
                h = old.copy()
                h["name"], h["release"], h["groups"] = w.name, w.release, list(w.groups)
                h["netns"], h["veth"], h["peer"] = netns, veth, peer
                h.setdefault("cut", False)
            else:
                h = {
                    "name": w.name,
                    "release": w.release,
                    "groups": list(w.groups),
                    "address": next(a for a in free if a not in used),
                    "netns": netns,
                    "veth": veth,
                    "peer": peer,
                    "cut": False,
                }
                used.add(h["address"])
            hosts.append(h)
        extra = list(known.values())  # hosts of an earlier up that are not asked for now: keep them
        state["hosts"] = hosts + extra
        save_state(state)
        ensure_bridge(lab, args.bridge, net)
        started = []
        for h in hosts:
            if host_running(lab, h["name"]):
                log(f"{h['name']}: already running ({h['address']})")
                ensure_netns(lab, h, state)
                write_identity(
                    lab_dir(lab) / h["name"] / "rootfs",
                    h["name"],
                    h["address"],
                    state["hosts"],
                    state["gateway"],
                )
                continue
            stop_host(lab, h)  # clean leftovers of a crashed host
            t0 = time.monotonic()
            root = prepare_rootfs(lab, h, state)
            write_identity(root, h["name"], h["address"], state["hosts"], state["gateway"])
            ensure_netns(lab, h, state)
            save_state(state)  # records the image version the host is layered on
            pid = boot(lab, h)
            log(
                f"{h['name']}: booting {h['release']} at {h['address']} (nspawn pid {pid}, "
                f"copy {time.monotonic() - t0:.1f}s)"
            )
            started.append(h)
        for h in started:
            status = wait_ready(state, h, timeout=args.timeout)
            log(f"{h['name']}: {status}")
        save_state(state)
        if args.inventory:
            write_inventory(state, Path(args.inventory))
    print(json.dumps(state, indent=2))


def write_inventory(state: LabState, path: Path) -> None:
    """A YAML inventory (JSON is valid YAML) with the hosts, their groups and ssh settings."""
    hosts: dict[str, dict[str, str]] = {}
    children: dict[str, dict[str, dict[str, dict[str, str]]]] = {}
    for h in state["hosts"]:
        hosts[h["name"]] = {"ansible_host": h["address"]}
        for g in h["groups"]:
            children.setdefault(g, {"hosts": {}})["hosts"][h["name"]] = {}
    inv = {
        "all": {
            "hosts": hosts,
            "children": children,
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": state["ssh_key"],
                "ansible_ssh_common_args": ("-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"),
                "facepipe_lab_name": state["lab"],
                "facepipe_lab_gateway": state["gateway"],
            },
        }
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(inv, indent=2) + "\n")
    log(f"inventory written to {path}")


def cmd_down(args: argparse.Namespace) -> None:
    lab = args.lab
    ldir = lab_dir(lab)
    state = load_state(lab)
    with locked(lab_lock(lab)):
        hosts: list[Host | HostRef] = [*(state.get("hosts", []) if state else [])]
        names = {h["name"] for h in hosts}
        # also hosts whose state was lost but whose directories remain
        if ldir.exists():
            for d in ldir.iterdir():
                if d.is_dir() and d.name not in names:
                    hosts.append({"name": d.name})
        for h in hosts:
            pid = host_pid(lab, h["name"])
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)  # start all shutdowns in parallel
        for h in hosts:
            stop_host(lab, h, timeout=args.timeout)
        teardown_network(lab, (state.get("bridge") if state else None) or args.bridge)
        if ldir.exists():
            for d in ldir.iterdir():
                if d.is_dir():
                    remove_rootfs(d)
            shutil.rmtree(ldir)
    for release in RELEASES:  # image versions that were kept only for this lab's hosts
        if (CACHE_DIR / release / "current").is_symlink():
            with locked(CACHE_DIR / f".{release}.lock"):
                prune_images(release)
    log(f"lab {lab} is down")


def get_host(args: argparse.Namespace) -> tuple[LabState, Host]:
    state = load_state(args.lab)
    if not state:
        raise LabError(f"lab {args.lab} does not exist")
    for h in state["hosts"]:
        if h["name"] == args.host:
            return state, h
    raise LabError(f"no host {args.host} in lab {args.lab}")


def cmd_cut(args: argparse.Namespace, cut: bool = True) -> None:
    with locked(lab_lock(args.lab)):
        state, h = get_host(args)
        apply_cut(args.lab, h["address"], h["veth"], cut)
        h["cut"] = cut
        save_state(state)
    log(f"{h['name']}: network {'cut (controller ssh still works)' if cut else 'restored'}")


def cmd_exec(args: argparse.Namespace) -> None:
    state, h = get_host(args)
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    os.execvp("ssh", ssh_cmd(state, h["address"], *cmd, tty=sys.stdin.isatty() and not cmd))


def cmd_status(args: argparse.Namespace) -> None:
    state = load_state(args.lab)
    if not state:
        print(json.dumps({"lab": args.lab, "exists": False}))
        return
    hosts: list[dict[str, object]] = []  # hosts.json entries with running, pid and system added
    for h in state["hosts"]:
        running = host_running(args.lab, h["name"])
        report: dict[str, object] = {**h, "running": running, "pid": host_pid(args.lab, h["name"])}
        if running:
            report["system"] = (
                run(
                    ssh_cmd(state, h["address"], "systemctl is-system-running"),
                    check=False,
                    capture=True,
                ).stdout.strip()
                or "unreachable"
            )
        hosts.append(report)
    print(json.dumps({**state, "hosts": hosts, "bridge_exists": link_exists(state["bridge"])}, indent=2))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="lab.py", description=(__doc__ or "").split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("images", help="build or refresh the cached base images")
    s.add_argument("--release", action="append", choices=RELEASES)
    s.add_argument("--refresh", action="store_true", help="rebuild even if fresh")
    s.set_defaults(func=cmd_images)
    s = sub.add_parser("up", help="create (or reuse) a lab and boot its hosts")
    s.add_argument("--lab", required=True)
    s.add_argument("--subnet", required=True, help="e.g. 10.231.40.0/24; gateway is .1, hosts .11..")
    s.add_argument("--bridge", required=True, help="bridge name, at most 15 characters")
    s.add_argument("--host", action="append", required=True, metavar="NAME:RELEASE[:GROUP,...]")
    s.add_argument("--inventory", help="also write an Ansible YAML inventory to this path")
    s.add_argument("--timeout", type=float, default=180)
    s.set_defaults(func=cmd_up)
    s = sub.add_parser("down", help="stop and remove everything of a lab")
    s.add_argument("--lab", required=True)
    s.add_argument("--bridge", help="bridge to remove if the state file is gone")
    s.add_argument("--timeout", type=float, default=30)
    s.set_defaults(func=cmd_down)
    for name, cut in (("cut", True), ("heal", False)):
        s = sub.add_parser(name, help=f"{'cut' if cut else 'restore'} a host's network to peers and outside")
        s.add_argument("--lab", required=True)
        s.add_argument("--host", required=True)
        s.set_defaults(func=lambda a, c=cut: cmd_cut(a, c))
    s = sub.add_parser("poweroff", help="power a host off hard: SIGKILL every process, keep its disk")
    s.add_argument("--lab", required=True)
    s.add_argument("--host", required=True)
    s.set_defaults(func=cmd_poweroff)
    s = sub.add_parser("poweron", help="boot a powered-off host from its disk")
    s.add_argument("--lab", required=True)
    s.add_argument("--host", required=True)
    s.add_argument("--timeout", type=float, default=180)
    s.set_defaults(func=cmd_poweron)
    for name, block in (("block", True), ("unblock", False)):
        s = sub.add_parser(name, help=f"{'drop' if block else 'allow again'} a host's TCP traffic to a gateway port")
        s.add_argument("--lab", required=True)
        s.add_argument("--host", required=True)
        s.add_argument("--port", type=int, required=True, help="e.g. the S3 endpoint's port on the gateway")
        s.set_defaults(func=lambda a, b=block: cmd_block(a, b))
    s = sub.add_parser("exec", help="run a command on a host over ssh")
    s.add_argument("--lab", required=True)
    s.add_argument("--host", required=True)
    s.add_argument("cmd", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec)
    s = sub.add_parser("status", help="show a lab's hosts")
    s.add_argument("--lab", required=True)
    s.set_defaults(func=cmd_status)
    args = p.parse_args(argv)
    try:
        if os.geteuid() != 0:
            raise LabError("must run as root")
        args.func(args)
    except LabError as e:
        log(f"error: {e}")
        sys.exit(1)


if __name__ == "__main__":
    main()
