#!/usr/bin/env python3
"""Certificates are reissued ahead of expiry, and an expiring CA stops the play.

Runs scripts/check-pki-renewal.yml (mqtt_pki alone, on the controller, in temporary directories)
with short validity periods and checks what a site depends on over the years: a re-run keeps a
certificate that is not due (same serial, nothing changed), a certificate inside the renewal window
is reissued and installed, and a CA inside it fails the play naming the rotation to do.
Exits 1 on any surprise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from cryptography import x509

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "scripts" / "check-pki-renewal.yml"
BIN = Path(sys.executable).parent


def play(workdir: Path, *flags: str, **extra: int) -> tuple[int, str]:
    args = [str(BIN / "ansible-playbook"), *flags, "-i", "localhost,", str(PLAYBOOK)]
    for name, value in {"mqtt_pki_dir": workdir / "pki", "mqtt_pki_cert_dir": workdir / "certs", **extra}.items():
        args += ["-e", f"{name}={value}"]
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(ROOT / "roles"), "ANSIBLE_NOCOLOR": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    return done.returncode, done.stdout + done.stderr


def serial(workdir: Path) -> int:
    return x509.load_pem_x509_certificate((workdir / "certs" / "server.crt").read_bytes()).serial_number


def changed(output: str) -> int:
    found = re.search(r"localhost\s+:.*changed=(\d+)", output)
    return int(found.group(1)) if found else -1


def main() -> int:
    problems: list[str] = []

    def expect(ok: bool, what: str, output: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems.append(what)
            print(output[-3000:])

    with tempfile.TemporaryDirectory(prefix="pki-renewal-") as tmp:
        site = Path(tmp) / "site"
        rc, out = play(site, "--check")
        expect(
            rc == 0 and "the first real run creates them" in out and not site.exists(),
            "check mode on a fresh controller passes and writes nothing",
            out,
        )
        rc, out = play(site, mqtt_pki_cert_valid_days=20, mqtt_pki_cert_renew_days=10)
        expect(
            rc == 0 and "server certificate: 19 days left" in out,
            "a new site: certificates issued, days left shown",
            out,
        )
        first = serial(site)
        rc, out = play(site, mqtt_pki_cert_valid_days=20, mqtt_pki_cert_renew_days=10)
        expect(rc == 0 and changed(out) == 0 and serial(site) == first, "a re-run keeps a certificate not yet due", out)
        rc, out = play(site, mqtt_pki_cert_valid_days=30, mqtt_pki_cert_renew_days=25)
        expect(
            rc == 0 and changed(out) > 0 and serial(site) != first,
            "a certificate inside the renewal window is reissued and installed",
            out,
        )
        second = serial(site)
        rc, out = play(site, mqtt_pki_cert_renew_days=30)
        expect(
            rc == 0 and serial(site) != second and "server certificate: 824 days left" in out,
            "a reissue takes the current validity",
            out,
        )
        third = serial(site)
        rc, out = play(site)
        expect(rc == 0 and changed(out) == 0 and serial(site) == third, "then the defaults keep it", out)
        rc, out = play(site, "--check", mqtt_pki_cert_valid_days=900, mqtt_pki_cert_renew_days=850)
        expect(
            rc == 0 and serial(site) == third and "824 days left" in out,
            "check mode on a site shows a renewal without making it",
            out,
        )

        rc, out = play(site, mqtt_pki_cert_renew_days=900)
        expect(
            rc != 0 and "mqtt_pki_cert_renew_days (900) must be" in out and serial(site) == third,
            "a renewal window longer than a certificate's life is refused",
            out,
        )

        old_ca = Path(tmp) / "old-ca"  # a CA made 20 days before its expiry, then the default window
        rc, out = play(old_ca, mqtt_pki_ca_valid_days=20, mqtt_pki_cert_renew_days=10)
        expect(rc == 0, "a CA with 20 days left passes a 10-day window", out)
        rc, out = play(old_ca)
        expect(
            rc != 0 and "rotate the CA" in out,
            "a CA with fewer days left than mqtt_pki_cert_renew_days stops the play",
            out,
        )
    print(f"pki renewal: 10 cases, {len(problems)} failures")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
