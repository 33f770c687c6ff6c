"""The layout of participant.ctx and of the key fingerprint: bytes only, no TenSEAL.

``participant.ctx`` is :data:`PARTICIPANT_MAGIC`, the length of the TenSEAL
context with the secret key (saved without relinearisation keys: TenSEAL
regenerates them at random when it loads a secret context), that context, the
evaluation context's relinearisation keys as SEAL serialises them, and a
SHA-256 of everything before it. The fingerprint covers the public keys, the
checksum the secret key (a damaged one would decrypt garbage, or tag the final
θ with a MAC key no other participant shares). :mod:`protocol.ckks` makes and
reads the parts.
"""

from __future__ import annotations

import hashlib
import struct

from protocol.errors import KeyMaterialError

#: first bytes of a participant.ctx (protocol 4 on)
PARTICIPANT_MAGIC = b"HEDRL-CKKS-PARTICIPANT-4\n"
_LENGTH = struct.Struct("<Q")
_CHECKSUM_BYTES = 32


def frame_secret(context: bytes, relin_keys: bytes) -> bytes:
    """Bytes of participant.ctx from the TenSEAL secret context and the
    relinearisation keys."""
    data = PARTICIPANT_MAGIC + _LENGTH.pack(len(context)) + context + relin_keys
    return data + hashlib.sha256(data).digest()


def unframe_secret(data: bytes) -> tuple[bytes, bytes]:
    """(TenSEAL secret context, relinearisation keys) of a participant.ctx, or
    :class:`KeyMaterialError` naming what is wrong and the fix."""
    if not data.startswith(PARTICIPANT_MAGIC):
        raise KeyMaterialError(
            "participant context is not a protocol-4 key file (it must start with "
            f"{PARTICIPANT_MAGIC!r} and store the relinearisation keys); "
            "provision a new key with hedrl-keygen"
        )
    at = len(PARTICIPANT_MAGIC)
    if len(data) < at + _LENGTH.size + _CHECKSUM_BYTES:
        raise KeyMaterialError(f"participant context truncated at {len(data)} bytes")
    data, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if hashlib.sha256(data).digest() != checksum:
        raise KeyMaterialError(
            "participant context damaged (its checksum does not match): restore "
            "it from the provisioned bundle"
        )
    (n,) = _LENGTH.unpack_from(data, at)
    at += _LENGTH.size
    context, relin_keys = data[at : at + n], data[at + n :]
    if len(context) != n or not relin_keys:
        raise KeyMaterialError(
            f"participant context: a {n}-byte TenSEAL context and relinearisation "
            f"keys expected, {len(data) - at} bytes follow the length"
        )
    return context, relin_keys


def fingerprint(param_set_id: str, public_key: bytes, relin_keys: bytes) -> str:
    """SHA-256 (hex) over the parameter-set id and SEAL's serialisations of the
    public key and the relinearisation keys, each preceded by its length."""
    h = hashlib.sha256()
    h.update(param_set_id.encode() + b"\0")
    for part in (public_key, relin_keys):
        h.update(_LENGTH.pack(len(part)))
        h.update(part)
    return h.hexdigest()
