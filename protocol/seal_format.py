"""Formats checked before SEAL or TenSEAL parses anything: no TenSEAL here.

SEAL's 16-byte serialisation header of a ciphertext, and TenSEAL's protobuf
record of a context, are read with the standard library and protobuf alone;
:mod:`protocol.ckks` calls these checks first, so what reaches SEAL or TenSEAL
is at least shaped as hedrl writes it (TenSEAL crashed on some malformed
records, SEAL accepts a few things hedrl never writes).
"""

from __future__ import annotations

import math
import os
import struct
from typing import Any

from protocol.errors import CiphertextError, KeyMaterialError, SecretKeyRefused
from protocol.params import ParamSet

#: SEAL's serialisation header: magic, header size, version major and minor,
#: compression mode, reserved, total size (little-endian, 16 bytes)
SEAL_HEADER = struct.Struct("<HBBBBHQ")
SEAL_MAGIC = 0xA15E
#: compression modes a chunk may use: none, or zstd (what SEAL's save writes);
#: zlib is never produced by hedrl and is refused
SEAL_COMPR_MODES = {0: "none", 2: "zstd"}


def check_seal_header(head: bytes, total: int, version: tuple[int, int]) -> None:
    """Check the SEAL header ``head`` (the first 16 bytes) of a serialisation of
    ``total`` bytes before SEAL parses it; raise :class:`CiphertextError`.

    The header must carry SEAL's magic and header size, SEAL ``version``, a
    compression mode in :data:`SEAL_COMPR_MODES`, a zero reserved field and a
    total size equal to ``total`` (no truncated or padded chunk reaches SEAL).
    """
    if len(head) < SEAL_HEADER.size:
        raise CiphertextError(
            f"chunk of {total} bytes is not a ciphertext: expected at least "
            f"SEAL's {SEAL_HEADER.size}-byte header"
        )
    magic, hsize, major, minor, compr, reserved, size = SEAL_HEADER.unpack_from(head)
    fields: tuple[tuple[str, object, object], ...] = (
        ("magic", f"0x{magic:04X}", f"0x{SEAL_MAGIC:04X}"),
        ("header size", hsize, SEAL_HEADER.size),
        ("version", f"{major}.{minor}", "{}.{}".format(*version)),
        ("reserved", reserved, 0),
        ("size", size, total),
    )
    for name, got, want in fields:
        if got != want:
            raise CiphertextError(
                f"chunk of {total} bytes is not a ciphertext: SEAL header {name} "
                f"{got}, expected {want}"
            )
    if compr not in SEAL_COMPR_MODES:
        modes = ", ".join(f"{k} ({v})" for k, v in SEAL_COMPR_MODES.items())
        raise CiphertextError(
            f"chunk of {total} bytes is not a ciphertext: SEAL header compr_mode "
            f"{compr}, expected {modes}"
        )


def read_seal_header(path: str) -> tuple[bytes, int]:
    """(the first bytes of the file at ``path`` — SEAL's header —, its size), or
    :class:`CiphertextError` if it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read(SEAL_HEADER.size), os.fstat(fh.fileno()).st_size
    except OSError as exc:
        raise CiphertextError(f"chunk of no bytes is not a ciphertext: {exc}") from exc


#: TenSEAL's context record (fields as in TenSEAL's tensealcontext.proto),
#: read here before TenSEAL parses it: TenSEAL crashes (SIGSEGV, measured) on a
#: record without a public key, which one flipped bit of a tag makes
_TENSEAL_RECORD: dict[str, tuple[tuple[str, int, int, str], ...]] = {
    "Public": (
        ("public_key", 1, 12, ""),
        ("auto_flags", 2, 13, ""),
        ("scale", 3, 1, ""),
        ("relin_keys", 4, 12, ""),
        ("galois_keys", 5, 12, ""),
    ),
    "Private": (
        ("secret_key", 1, 12, ""),
        ("relin_keys_generated", 2, 8, ""),
        ("galois_keys_generated", 3, 8, ""),
    ),
    "Context": (
        ("encryption_parameters", 1, 12, ""),
        ("public_context", 2, 11, "Public"),
        ("private_context", 3, 11, "Private"),
        ("encryption_type", 4, 13, ""),
    ),
}
#: auto_flags of :func:`create_context`'s contexts: auto relinearise, rescale
#: and modulus-switch (TenSEAL's defaults)
TENSEAL_AUTO_FLAGS = 7


def _tenseal_record() -> Any:
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(
        name="hedrl_tenseal_context.proto", package="hedrl.tenseal", syntax="proto3"
    )
    for message, fields in _TENSEAL_RECORD.items():
        m = fdp.message_type.add(name=message)
        for name, number, ftype, sub in fields:
            ref = f".hedrl.tenseal.{sub}" if sub else None
            m.field.add(name=name, number=number, type=ftype, label=1, type_name=ref)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("hedrl.tenseal.Context")
    return message_factory.GetMessageClass(desc)


TenSEALRecord = _tenseal_record()


def check_record(data: bytes, params: ParamSet | None, *, secret: bool) -> None:
    """Check TenSEAL's context record ``data`` before TenSEAL parses it: it is
    exactly the record it parses to (no unknown or repeated field), with the
    parts a secret (participant) or evaluation (coordinator) context has, and
    the stored fields — flags, key type, scale (``params``) — as
    :func:`create_context` writes them. Keys and parameters themselves are
    checked by SEAL as TenSEAL loads them."""
    rec = TenSEALRecord()
    try:
        rec.ParseFromString(data)
        canonical = rec.SerializeToString() == data
    except Exception as exc:  # protobuf DecodeError
        raise KeyMaterialError(f"not a TenSEAL context: {exc}") from exc
    if not canonical:
        raise KeyMaterialError(
            "not a TenSEAL context as TenSEAL writes it (unknown, repeated or "
            "out-of-order fields)"
        )
    pub, priv = rec.public_context, rec.private_context
    if not secret and rec.HasField("private_context"):
        raise SecretKeyRefused(
            "evaluation context holds a secret key; the coordinator only accepts "
            "a public context (public key + relinearisation keys)"
        )
    got: dict[str, object] = {
        "encryption parameters": bool(rec.encryption_parameters),
        "public key": bool(pub.public_key),
        "auto_flags": pub.auto_flags,
        "encryption_type": rec.encryption_type,
        "Galois keys": bool(pub.galois_keys),
        "relinearisation keys": bool(pub.relin_keys),
    }
    want: dict[str, object] = {
        "encryption parameters": True,
        "public key": True,
        "auto_flags": TENSEAL_AUTO_FLAGS,
        "encryption_type": 0,  # public-key encryption
        "Galois keys": False,
        "relinearisation keys": not secret,  # stored beside it (participant.ctx)
    }
    if secret:
        got["secret key"] = bool(priv.secret_key)
        got["generated keys"] = (priv.relin_keys_generated, priv.galois_keys_generated)
        want["secret key"], want["generated keys"] = True, (False, False)
    if params is not None:
        got["global scale"], want["global scale"] = pub.scale, params.scale
    for name, expected in want.items():
        if got[name] != expected:
            raise KeyMaterialError(
                f"{'participant' if secret else 'evaluation'} context {name} "
                f"{got[name]}, expected {expected}"
            )


def check_ciphertext(
    params: ParamSet,
    level: int,
    want_id: Any,
    *,
    degree: int,
    at_level: int,
    parms_id: Any,
    size: int,
    ntt: bool,
    scale: float,
) -> None:
    """Raise :class:`CiphertextError` naming the first field of a parsed
    ciphertext that differs from what hedrl sends at ``level`` (parms_id
    ``want_id``): polynomial degree, level (coefficient moduli), parms_id, size
    2, NTT form, and a scale of exactly Δ (finite; a product's true scale Δ²/q
    is refused)."""
    if degree != params.poly_modulus_degree:
        raise CiphertextError(
            f"ciphertext polynomial degree {degree}, expected "
            f"{params.poly_modulus_degree}"
        )
    if at_level != level:
        raise CiphertextError(f"ciphertext at level {at_level}, expected level {level}")
    if want_id is None or list(parms_id) != list(want_id):
        raise CiphertextError(
            f"ciphertext parms_id {hex_id(parms_id)}, expected "
            f"{'none' if want_id is None else hex_id(want_id)} (level {level})"
        )
    if size != 2:
        raise CiphertextError(f"ciphertext of size {size}, expected 2")
    if not ntt:
        raise CiphertextError("ciphertext not in NTT form, expected NTT form")
    if scale != params.scale:  # also NaN
        raise CiphertextError(
            f"ciphertext scale {describe_scale(scale, params.scale)}, "
            f"expected 2^{params.scale_bits}"
        )


def hex_id(parms_id: Any) -> str:
    return "".join(f"{int(w):016x}" for w in parms_id)[:16] + "…"


def describe_scale(scale: float, delta: float) -> str:
    if math.isfinite(scale) and scale > 0:
        return f"2^{math.log2(scale):.7f} (x{scale / delta!r} of Δ)"
    return repr(scale)
