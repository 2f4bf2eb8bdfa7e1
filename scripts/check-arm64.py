#!/usr/bin/env python3
"""An arm64 (Raspberry Pi) edge's software, proven on this amd64 machine under qemu-user.

`make test-arm64` (opt-in: about 10 minutes, most of it emulated debootstrap and pip; not part of
`make test`). In a Debian arm64 root file system, run through qemu-user-static and binfmt_misc:

1. Mosquitto comes from the archive the mosquitto role uses (bookworm-backports on Debian 12);
2. the facepipe wheel installs into a virtualenv with the pins of services/constraints.txt, every
   dependency from a binary wheel (``--only-binary=:all:``: nothing is compiled on a Pi);
3. face-detector runs the sample clip against that Mosquitto and publishes faces that decode under
   the message contract; the same clip through the amd64 detector is printed beside it.

Why a chroot and not a lab host booted by systemd-nspawn: systemd boots under qemu-user, but the
units' sandbox does not start there. qemu-user 7.2 answers EINVAL to the namespaces systemd sets up
for ``PrivateUsers=`` (status 217/USER) and ``LoadCredential=`` (243/CREDENTIALS), both of which
facepipe's units use; on a real arm64 kernel they work as on amd64.

The base file system is cached under /var/cache/facepipe-lab/arm64-<release>/ (a week, like the
lab's images); each run works on a copy, removed afterwards. Talks to the Debian mirror and PyPI
(through the same settings as the host's pip) and to its own Mosquitto on 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "services" / "src"))

from facepipe import contract  # noqa: E402  (the repository's own package, from the source tree)

CACHE = Path(os.environ.get("FACEPIPE_LAB_CACHE", "/var/cache/facepipe-lab"))
MIRROR = os.environ.get("FACEPIPE_LAB_MIRROR", "http://deb.debian.org/debian")
MAX_AGE = 7 * 24 * 3600
DEVICE = "arm64-edge"
REFERENCE = "amd64-reference"
CHROOT_ENV = {
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "DEBIAN_FRONTEND": "noninteractive",
}


def say(text: str) -> None:
    print(f"arm64: {text}", flush=True)


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def ensure_binfmt() -> str:
    """qemu-user-static registered for arm64 ELF files, with the F flag (usable inside a chroot)."""
    entry = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
    if not Path("/usr/bin/qemu-aarch64-static").exists():
        say("installing qemu-user-static and binfmt-support")
        run(["apt-get", "install", "-y", "-q", "qemu-user-static", "binfmt-support"], stdout=subprocess.DEVNULL)
    if not Path("/proc/sys/fs/binfmt_misc/status").exists():
        run(["mount", "-t", "binfmt_misc", "binfmt_misc", "/proc/sys/fs/binfmt_misc"])
    if not entry.exists():
        run(["update-binfmts", "--enable", "qemu-aarch64"])
    text = entry.read_text()
    flags = re.search(r"^flags: (\S*)", text, re.M)
    if "enabled" not in text or not flags or "F" not in flags.group(1):
        raise SystemExit(f"arm64: {entry} is not enabled with the F flag:\n{text}")
    version = run(["qemu-aarch64-static", "--version"], capture_output=True).stdout.splitlines()[0]
    return version


def chroot(
    root: Path, argv: list[str], env: dict[str, str] | None = None, **kwargs: object
) -> subprocess.CompletedProcess[str]:
    return run(["chroot", str(root), *argv], env={**CHROOT_ENV, **(env or {})}, **kwargs)


def base_image(release: str) -> Path:
    """The cached arm64 base file system (debootstrap under qemu-user: minutes, so kept a week)."""
    folder = CACHE / f"arm64-{release}"
    rootfs = folder / "rootfs"
    stamp = folder / "built"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < MAX_AGE:
        return rootfs
    folder.mkdir(parents=True, exist_ok=True)
    building = folder / f"rootfs.build-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    say(f"building the {release} arm64 base image with debootstrap (about 5 minutes under emulation)")
    started = time.monotonic()
    run(
        [
            "debootstrap",
            "--arch=arm64",
            "--variant=minbase",
            "--include=python3,python3-venv,ca-certificates",
            release,
            str(building),
            MIRROR,
        ],
        stdout=subprocess.DEVNULL,
    )
    # The host's CA bundle, as the lab does: a proxy that re-signs TLS is trusted in here too.
    shutil.copyfile(
        "/etc/ssl/certs/ca-certificates.crt", building / "usr/local/share/ca-certificates/controller-ca.crt"
    )
    chroot(building, ["update-ca-certificates"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shutil.rmtree(rootfs, ignore_errors=True)
    building.rename(rootfs)
    stamp.touch()
    say(f"base image built in {time.monotonic() - started:.0f} s")
    return rootfs


@contextlib.contextmanager
def mounted(root: Path, share: Path) -> Iterator[None]:
    targets: list[Path] = []
    try:
        for source, target, options in (
            ("proc", "proc", ["-t", "proc"]),
            ("sysfs", "sys", ["-t", "sysfs"]),
            ("/dev", "dev", ["--bind"]),
            ("/dev/pts", "dev/pts", ["--bind"]),
            (str(share), "opt/check", ["--bind"]),
        ):
            (root / target).mkdir(parents=True, exist_ok=True)
            run(["mount", *options, source, str(root / target)])
            targets.append(root / target)
        yield
    finally:
        for point in reversed(targets):
            subprocess.run(["umount", "-l", str(point)], check=False)
        still = [str(point) for point in targets if os.path.ismount(point)]
        if still:  # never let the temporary folder's removal reach into a bound /dev
            raise SystemExit(f"arm64: still mounted, not removing {root}: {still}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Faces:
    """Collects face messages per device from the broker (paho from the host's environment)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.faces: dict[str, list[contract.FaceMeta]] = {DEVICE: [], REFERENCE: []}
        self.bad: list[str] = []
        self.ready = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
        self.client.on_connect = lambda c, *_: c.subscribe("faces/#", qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = self.on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def on_message(self, client: object, userdata: object, msg: object) -> None:
        topic, payload = msg.topic, msg.payload  # type: ignore[attr-defined]
        if topic.endswith("/status"):
            return
        try:
            meta, _jpeg = contract.decode_face(payload)
        except contract.ContractError as exc:
            self.bad.append(f"{topic}: {exc}")
            return
        self.faces.setdefault(meta.device_id, []).append(meta)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def detector_env(port: int, device: str, clip: str) -> dict[str, str]:
    return {
        "FACEPIPE_SOURCE": clip,
        "FACEPIPE_DEVICE_ID": device,
        "FACEPIPE_MQTT_HOST": "127.0.0.1",
        "FACEPIPE_MQTT_PORT": str(port),
        "FACEPIPE_REALTIME": "false",
        "FACEPIPE_STATS_INTERVAL": "30",
    }


def timed(argv: list[str], env: dict[str, str], log: Path) -> float:
    """Run to the end; the child's CPU seconds (user + system)."""
    before = os.times()
    with log.open("w") as out:
        done = subprocess.run(argv, env=env, stdout=out, stderr=subprocess.STDOUT, check=False, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"arm64: {argv[-1]} exited {done.returncode}:\n{log.read_text()[-3000:]}")
    after = os.times()
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--release", default="bookworm", choices=["bookworm", "trixie"])
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("arm64: run as root (debootstrap, chroot, mounts)")
    if os.environ.get("CHECK_ARM64_UNSHARED") != "1":
        # A mount namespace of its own: the chroot's mounts (/dev bound in) vanish with this process,
        # however it ends, and never show on the host.
        os.environ["CHECK_ARM64_UNSHARED"] = "1"
        argv = ["unshare", "--mount", "--propagation", "private", sys.executable, *sys.argv]
        os.execvp("unshare", argv)
    started = time.monotonic()
    qemu = ensure_binfmt()
    say(qemu)
    base = base_image(args.release)
    with tempfile.TemporaryDirectory(prefix="facepipe-arm64-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        root, share = work / "rootfs", work / "share"
        share.mkdir()
        run(["cp", "-a", "--reflink=auto", str(base), str(root)])
        say("building the wheel and the sample clip on the host")
        # From a copy: a build in the checkout would leave root-owned build/ and *.egg-info there.
        source = work / "services"
        shutil.copytree(
            ROOT / "services", source, ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__")
        )
        with (work / "wheel.log").open("w") as log:  # setuptools' deprecation warnings go there
            run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(share), str(source)], stderr=log)
        wheel = next(share.glob("facepipe-*.whl")).name
        shutil.copyfile(ROOT / "services" / "constraints.txt", share / "constraints.txt")
        run([sys.executable, "-m", "facepipe.sampleclip", str(share / "sample.avi")], stdout=subprocess.DEVNULL)
        with mounted(root, share):
            # Packages install without starting services (no init in a chroot).
            (root / "usr/sbin/policy-rc.d").write_text("#!/bin/sh\nexit 101\n")
            (root / "usr/sbin/policy-rc.d").chmod(0o755)
            (root / "etc/resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
            install = ["apt-get", "install", "-y", "-q", "--no-install-recommends"]
            if args.release == "bookworm":  # as the mosquitto role does on Debian 12
                (root / "etc/apt/sources.list.d/backports.list").write_text(f"deb {MIRROR} bookworm-backports main\n")
                install += ["-t", "bookworm-backports"]
            say("installing Mosquitto from Debian's arm64 packages")
            chroot(root, ["apt-get", "update", "-q"], stdout=subprocess.DEVNULL)
            chroot(root, [*install, "mosquitto"], stdout=subprocess.DEVNULL)
            arch = chroot(root, ["dpkg", "--print-architecture"], capture_output=True).stdout.strip()
            mosquitto = chroot(root, ["dpkg-query", "-W", "-f=${Version}", "mosquitto"], capture_output=True).stdout
            say(f"mosquitto {mosquitto} ({arch})")

            say("installing the facepipe wheel with its pins, binary wheels only")
            pip_env = {"PIP_CERT": "/etc/ssl/certs/ca-certificates.crt", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
            for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_DEFAULT_TIMEOUT"):
                if name in os.environ:
                    pip_env[name] = os.environ[name]
            chroot(root, ["python3", "-m", "venv", "/opt/facepipe/venv"])
            chroot(
                root,
                [
                    "/opt/facepipe/venv/bin/pip",
                    "install",
                    "-q",
                    "--only-binary=:all:",
                    "-c",
                    "/opt/check/constraints.txt",
                    f"/opt/check/{wheel}",
                ],
                env=pip_env,
            )
            frozen = chroot(root, ["/opt/facepipe/venv/bin/pip", "freeze"], capture_output=True).stdout
            pins = {line.split("==")[0].lower(): line.split("==")[1] for line in frozen.splitlines() if "==" in line}
            say(f"installed: opencv-python-headless {pins.get('opencv-python-headless')}, numpy {pins.get('numpy')}")

            port = free_port()
            (share / "mosquitto.conf").write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
            broker = subprocess.Popen(
                ["chroot", str(root), "/usr/sbin/mosquitto", "-c", "/opt/check/mosquitto.conf"],
                env=CHROOT_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            faces = None
            try:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        faces = Faces(port)
                        break
                    except OSError:
                        if time.monotonic() > deadline or broker.poll() is not None:
                            raise
                        time.sleep(0.5)
                if not faces.ready.wait(30):
                    raise SystemExit("arm64: no subscription to the arm64 Mosquitto")
                say("running face-detector (arm64, emulated) on the sample clip")
                arm_cpu = timed(
                    ["chroot", str(root), "/opt/facepipe/venv/bin/face-detector"],
                    {**CHROOT_ENV, **detector_env(port, DEVICE, "/opt/check/sample.avi")},
                    work / "detector-arm64.log",
                )
                say("running face-detector (amd64, native) on the same clip, as the reference")
                ref_cpu = timed(
                    [str(Path(sys.executable).parent / "face-detector")],
                    {**os.environ, **detector_env(port, REFERENCE, str(share / "sample.avi"))},
                    work / "detector-amd64.log",
                )
                time.sleep(2)
            finally:
                if faces is not None:
                    faces.close()
                broker.terminate()
                broker.wait(10)
            arm, ref = faces.faces[DEVICE], faces.faces[REFERENCE]
            print(f"{'detector':<28}{'faces':>7}{'CPU s':>9}")
            print(f"{'arm64 (qemu-user)':<28}{len(arm):>7}{arm_cpu:>9.1f}")
            print(f"{'amd64 (native)':<28}{len(ref):>7}{ref_cpu:>9.1f}")
            if faces.bad or not arm:
                print((work / "detector-arm64.log").read_text()[-3000:])
                raise SystemExit(f"arm64: FAILED: {len(arm)} faces from the arm64 detector; not valid: {faces.bad}")
    say(
        f"OK in {time.monotonic() - started:.0f} s: Debian {args.release} arm64, mosquitto {mosquitto}, "
        f"wheels only, {len(arm)} valid faces from the arm64 detector ({len(ref)} from amd64)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
