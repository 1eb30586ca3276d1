"""TLS certificates and SuperNode keys for the test federation, made with the commands docs/deployment.md shows.

`tls_certificates(d)` runs the doc's certificate block (section "TLS certificates") as it is written, so a
change to the doc that breaks it fails the deployment tests; `node_key(path)` runs the doc's `ssh-keygen`
command. Where `openssl` or `ssh-keygen` is missing, the same files are written with `cryptography`.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DOC = Path(__file__).resolve().parents[1] / "docs" / "deployment.md"
SECTION = "## TLS certificates"


def doc_cert_commands(doc: Path = DOC) -> str:
    """The first ```bash block of the doc's "TLS certificates" section that runs `openssl`."""
    text = doc.read_text()
    start = text.find(f"\n{SECTION}\n")
    assert start >= 0, f"{doc} has no '{SECTION}' section"
    section = text[start + 1:]
    end = section.find("\n## ", 1)
    section = section if end < 0 else section[:end]
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        if "openssl req" in block:
            return block
    raise AssertionError(f"no ```bash block with `openssl req` in the '{SECTION}' section of {doc}")


def tls_certificates(d: Path) -> dict[str, Path]:
    """A private CA and a server certificate for 127.0.0.1 and localhost, in d/certs: ca.crt, server.pem, server.key."""
    if shutil.which("openssl"):
        # the doc's commands, verbatim (they also check the chain under `openssl verify -x509_strict`)
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", doc_cert_commands()], cwd=d, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, f"the certificate commands of docs/deployment.md failed:\n{r.stdout}{r.stderr}"
    else:
        _tls_with_cryptography(d / "certs")
    out = {"ca": d / "certs" / "ca.crt", "cert": d / "certs" / "server.pem", "key": d / "certs" / "server.key"}
    for name, path in out.items():
        assert path.is_file(), f"{name}: {path} was not written"
    return out


def _tls_with_cryptography(d: Path) -> None:
    """What the doc's openssl commands write, made with `cryptography` (P-256 keys, same extensions)."""
    d.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedlora-ca")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "superlink")]))
              .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=365))
              .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                          x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                           data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                           crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    for path, k in ((d / "ca.key", ca_key), (d / "server.key", key)):
        path.write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (d / "ca.crt").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(server.public_bytes(pem))


def node_key(path: Path) -> tuple[Path, Path]:
    """A SuperNode's ECDSA P-384 key pair in OpenSSH format: `path` (private) and `path`.pub (public)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if shutil.which("ssh-keygen"):
        # the doc's command
        r = subprocess.run(["ssh-keygen", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(path)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"ssh-keygen failed:\n{r.stdout}{r.stderr}"
    else:
        key = ec.generate_private_key(ec.SECP384R1())
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
        path.chmod(0o600)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        Path(f"{path}.pub").write_bytes(pub + f" {path.name}\n".encode())
    return path, Path(f"{path}.pub")


def public_key_pem(pub: Path) -> bytes:
    """The public key as the SuperLink names it in its log (PEM SubjectPublicKeyInfo)."""
    key = serialization.load_ssh_public_key(pub.read_bytes())
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
