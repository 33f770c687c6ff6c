"""Key material: provisioning on the participants' side, loading on both sides.

A key directory holds ``participant.ctx`` (secret key, mode 0600),
``coordinator.ctx`` (public + relinearisation keys only) and
``fingerprint.txt``. Provisioning takes an exclusive ``flock`` on
``DIR/.lock`` and writes each file to a temp name before an atomic rename, so
four simulated participants starting at once create exactly one key.

The plaintext twin provisions a key-less stand-in (a random token) through the
same functions, so both backends run the same code path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from protocol.backend import Backend, PlainBackend
from protocol.errors import ConfigError, KeyMaterialError, SecretKeyRefused
from protocol.files import write_atomic
from protocol.params import ParamSet

log = logging.getLogger(__name__)

PARTICIPANT_FILE = "participant.ctx"
COORDINATOR_FILE = "coordinator.ctx"
FINGERPRINT_FILE = "fingerprint.txt"
_PLAIN_MAGIC = b"HEDRL-PLAIN-CONTEXT\n"


@dataclass(frozen=True)
class KeyInfo:
    """Where a provisioned key lives and its fingerprint."""

    directory: Path
    fingerprint: str
    created: bool

    @property
    def participant_path(self) -> Path:
        return self.directory / PARTICIPANT_FILE

    @property
    def coordinator_path(self) -> Path:
        return self.directory / COORDINATOR_FILE


def _plain_fingerprint(param_set_id: str, token: str) -> str:
    return hashlib.sha256(f"{param_set_id}\0plain\0{token}".encode()).hexdigest()


def generate(params: ParamSet, backend: str) -> tuple[bytes, bytes, str]:
    """Fresh key material: (participant bytes, coordinator bytes, fingerprint)."""
    if backend == "plain":
        token = secrets.token_hex(32)
        body = {"param_set": params.id, "token": token}
        sec = _PLAIN_MAGIC + json.dumps({**body, "secret": True}).encode()
        pub = _PLAIN_MAGIC + json.dumps({**body, "secret": False}).encode()
        return sec, pub, _plain_fingerprint(params.id, token)
    if backend != "ckks":
        raise ConfigError(f"unknown backend {backend!r}; expected 'ckks' or 'plain'")
    from protocol import ckks

    ctx = ckks.create_context(params)
    relin_keys = ckks.relin_key_bytes(ctx)
    return (
        ckks.serialize_secret(ctx, relin_keys),
        ckks.serialize_public(ctx, relin_keys),
        ckks.fingerprint(ctx, params.id, relin_keys),
    )


def write_keys(
    directory: Path, params: ParamSet, backend: str, *, force: bool
) -> KeyInfo:
    """Generate and write a key directory (the ``hedrl-keygen`` command)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    targets = [directory / PARTICIPANT_FILE, directory / COORDINATOR_FILE]
    existing = [p for p in targets if p.exists()]
    if existing and not force:
        raise KeyMaterialError(
            f"refusing to overwrite {', '.join(str(p) for p in existing)} "
            "(pass --force to replace the key)"
        )
    sec, pub, fp = generate(params, backend)
    write_atomic(directory / PARTICIPANT_FILE, sec, 0o600)
    write_atomic(directory / COORDINATOR_FILE, pub, 0o644)
    write_atomic(directory / FINGERPRINT_FILE, (fp + "\n").encode(), 0o644)
    return KeyInfo(directory, fp, created=True)


def provision(directory: Path, params: ParamSet, backend: str) -> KeyInfo:
    """Create the run's key exactly once, however many participants race here."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(directory / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            fp_path = directory / FINGERPRINT_FILE
            if (directory / PARTICIPANT_FILE).exists() and fp_path.exists():
                return KeyInfo(directory, fp_path.read_text().strip(), created=False)
            info = write_keys(directory, params, backend, force=True)
            log.info("provisioned a fresh %s key in %s", backend, directory)
            return info
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# Loading a secret context regenerates keys (~0.3 s at N=8192): cache a few per
# process, least recently used first out (a long benchmark sweep makes many keys).
# The file's identity is part of the cache key: a key replaced at the same path
# (rotated, or a run directory started over) is loaded again, not served stale.
_CACHE_SIZE = 4
_cache: OrderedDict[tuple[object, ...], tuple[Backend, str]] = OrderedDict()
_cache_lock = threading.Lock()


def _plain_body(data: bytes) -> dict[str, object]:
    try:
        body = json.loads(data[len(_PLAIN_MAGIC) :])
    except ValueError as exc:
        raise KeyMaterialError(f"corrupt plaintext-twin context: {exc}") from exc
    return dict(body)


def _mac_key(secret: bytes) -> bytes:
    """A MAC key only key holders can derive (SHA-256 of the secret, labelled)."""
    return hashlib.sha256(b"hedrl-mac-key\0" + secret).digest()


def participant_backend(
    path: Path, params: ParamSet, backend: str
) -> tuple[Backend, str]:
    """Load the secret context at ``path`` once per process: (backend, fingerprint)."""
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read participant context: {exc}") from exc
    key = (str(path), st.st_ino, st.st_mtime_ns, st.st_size, params.id, backend)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyMaterialError(f"cannot read participant context: {exc}") from exc
        if backend == "plain":
            if not data.startswith(_PLAIN_MAGIC):
                raise KeyMaterialError("expected a plaintext-twin context, got CKKS")
            body = _plain_body(data)
            if body.get("param_set") != params.id:
                raise KeyMaterialError(
                    f"key is for parameter set {body.get('param_set')!r}, "
                    f"not {params.id!r}"
                )
            out: tuple[Backend, str] = (
                PlainBackend(params),
                _plain_fingerprint(params.id, str(body["token"])),
            )
            out[0].mac_key = _mac_key(str(body["token"]).encode())
        else:
            if data.startswith(_PLAIN_MAGIC):
                raise KeyMaterialError(
                    "expected a CKKS context, got a plaintext twin's"
                )
            from protocol import ckks

            sc = ckks.load_secret_context(data)
            ckks.check_params(sc.ctx, params)
            out = (
                ckks.CkksBackend(params, sc.ctx, sc.relin_keys),
                ckks.fingerprint(sc.ctx, params.id, sc.relin_keys),
            )
            out[0].mac_key = _mac_key(ckks.secret_key_bytes(sc.ctx))
        _cache[key] = out
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
        return out


def coordinator_backend(
    data: bytes, params: ParamSet, backend: str
) -> tuple[Backend, str]:
    """Load an evaluation context (refusing any secret key): (backend, fingerprint)."""
    if backend == "plain":
        if not data.startswith(_PLAIN_MAGIC):
            raise KeyMaterialError("expected a plaintext-twin context, got CKKS")
        body = _plain_body(data)
        if body.get("secret") is not False:
            raise SecretKeyRefused("plaintext-twin context marked secret")
        return PlainBackend(params), _plain_fingerprint(params.id, str(body["token"]))
    if data.startswith(_PLAIN_MAGIC):
        raise KeyMaterialError("expected a CKKS context, got a plaintext twin's")
    from protocol import ckks

    ctx = ckks.load_public_context(data, params)
    relin_keys = ckks.relin_key_bytes(ctx)
    return ckks.CkksBackend(params, ctx), ckks.fingerprint(ctx, params.id, relin_keys)


def evaluation_context(path: Path, params: ParamSet, backend: str) -> bytes:
    """Bytes of the evaluation context belonging to the secret context at ``path``.

    Taken from ``coordinator.ctx`` beside it when present, otherwise derived
    (a deployed participant host holds only ``participant.ctx``).
    """
    sibling = path.with_name(COORDINATOR_FILE)
    if sibling.exists():
        return sibling.read_bytes()
    data = path.read_bytes()
    if backend == "plain":
        body = _plain_body(data)
        return _PLAIN_MAGIC + json.dumps({**body, "secret": False}).encode()
    from protocol import ckks

    sc = ckks.load_secret_context(data)
    return ckks.serialize_public(sc.ctx, sc.relin_keys)
