#!/usr/bin/env python3
"""Certificates are reissued ahead of expiry; what cannot be reissued is warned of, and stops the
play only once expired.

Runs scripts/check-pki-renewal.yml (mqtt_pki alone, on the controller, in temporary directories)
with short validity periods and checks what a site depends on over the years: a re-run keeps a
certificate that is not due (same serial, nothing changed), a certificate inside the renewal window
is reissued and installed, a CA that a new certificate would outlive is a warning naming the
rotation to do, and your own files (*_src) are warned of inside the window, refused when expired or
missing. Exits 1 on any surprise.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parent.parent
PLAYBOOK = ROOT / "scripts" / "check-pki-renewal.yml"
BIN = Path(sys.executable).parent


def own_files(where: Path, ca_days: int, server_days: int) -> dict[str, Path]:
    """A CA and a server certificate of your own (as mqtt_pki_*_src gives them), each expiring in
    the given number of days (negative: expired that long ago)."""
    where.mkdir(parents=True)
    now = datetime.now(UTC)

    def certificate(
        name: str,
        key: ec.EllipticCurvePrivateKey,
        issuer: x509.Name,
        signer: ec.EllipticCurvePrivateKey,
        days: int,
        ca: bool,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=400))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA256())
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "own CA")])
    server_key = ec.generate_private_key(ec.SECP256R1())
    files = {
        "mqtt_pki_ca_cert_src": certificate("own CA", ca_key, ca_name, ca_key, ca_days, True),
        "mqtt_pki_server_cert_src": certificate("broker.test", server_key, ca_name, ca_key, server_days, False),
    }
    paths = {}
    for variable, cert in files.items():
        paths[variable] = where / f"{variable}.pem"
        paths[variable].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["mqtt_pki_server_key_src"] = where / "server.key"
    paths["mqtt_pki_server_key_src"].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def play(workdir: Path, *flags: str, **extra: int | str | Path) -> tuple[int, str]:
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

    cases = 0

    def expect(ok: bool, what: str, output: str) -> None:
        nonlocal cases
        cases += 1
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            problems.append(what)
            print(output[-3000:])

    with tempfile.TemporaryDirectory(prefix="pki-renewal-") as tmp:
        site = Path(tmp) / "site"
        rc, out = play(site, "--check")
        expect(
            rc == 0 and "first real run creates them" in out and not site.exists(),
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

        host_ca = (site / "certs" / "facepipe-ca.crt").read_bytes()
        fresh = Path(tmp) / "fresh-clone"  # a controller without the site's CA
        for flags in ((), ("--check",)):
            rc, out = play(site, *flags, mqtt_pki_dir=fresh)
            expect(
                rc != 0
                and "trusts a CA" in out
                and "does not exist on this controller" in out
                and (site / "certs" / "facepipe-ca.crt").read_bytes() == host_ca
                and serial(site) == third
                and not fresh.exists(),
                f"a controller without the site's CA stops before changing anything{' (check mode)' if flags else ''}",
                out,
            )
        rc, out = play(site, mqtt_pki_dir=fresh, mqtt_pki_ca_replace="true")
        expect(
            rc == 0 and (site / "certs" / "facepipe-ca.crt").read_bytes() != host_ca and serial(site) != third,
            "with mqtt_pki_ca_replace=true the new CA and certificates are installed (a rotation)",
            out,
        )

        old_ca = Path(tmp) / "old-ca"  # a CA made 20 days before its expiry, then the default window
        rc, out = play(old_ca, mqtt_pki_ca_valid_days=20, mqtt_pki_cert_valid_days=10, mqtt_pki_cert_renew_days=5)
        expect(rc == 0 and "WARNING, replace soon" not in out, "a CA that outlives a new certificate: no warning", out)
        rc, out = play(old_ca, mqtt_pki_cert_renew_days=10)
        expect(
            rc == 0 and "WARNING, replace soon: CA" in out and "rotate" in out and "the CA" in out,
            "a CA that a new certificate would outlive is a warning naming the rotation, not a stop",
            out,
        )
        rc, out = play(old_ca)
        expect(
            rc != 0 and "TLS material to replace now" in out and "rotate the CA" in out,
            "a CA inside the renewal window stops the play a month before the outage",
            out,
        )

        own = own_files(Path(tmp) / "own-soon", ca_days=3000, server_days=20)
        rc, out = play(Path(tmp) / "own-soon", mqtt_pki_generate="false", **own)
        expect(
            rc == 0 and "give a new one in mqtt_pki_server_cert_src" in out,
            "your own certificate inside the renewal window is a warning naming its variable",
            out,
        )
        own = own_files(Path(tmp) / "own-expired", ca_days=-1, server_days=20)
        rc, out = play(Path(tmp) / "own-expired", mqtt_pki_generate="false", **own)
        expect(
            rc != 0 and "TLS material to replace now" in out and "expired on" in out and "rotate the CA" in out,
            "an expired CA stops the play",
            out,
        )
        own["mqtt_pki_server_key_src"] = Path(tmp) / "nowhere.key"
        rc, out = play(Path(tmp) / "own-expired", "--check", mqtt_pki_generate="false", **own)
        expect(
            rc != 0 and "Not found on the controller" in out and "nowhere.key" in out,
            "a missing file of your own is refused by name, also in check mode",
            out,
        )
    print(f"pki renewal: {cases} cases, {len(problems)} failures")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
