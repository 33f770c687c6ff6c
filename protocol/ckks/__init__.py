"""The only package that imports TenSEAL: contexts and keys
(:mod:`protocol.ckks.context`) and the CKKS backend (:mod:`protocol.ckks.backend`).

Everything else in hedrl reaches TenSEAL through the names re-exported here.
"""

from protocol.ckks.backend import CkksBackend
from protocol.ckks.context import (
    PARTICIPANT_MAGIC,
    SEAL_VERSION,
    SecretContext,
    _save_bytes,
    check_params,
    create_context,
    fingerprint,
    load_public_context,
    load_secret_context,
    relin_key_bytes,
    secret_key_bytes,
    serialize_public,
    serialize_secret,
)

__all__ = [
    "PARTICIPANT_MAGIC",
    "SEAL_VERSION",
    "CkksBackend",
    "SecretContext",
    "_save_bytes",
    "check_params",
    "create_context",
    "fingerprint",
    "load_public_context",
    "load_secret_context",
    "relin_key_bytes",
    "secret_key_bytes",
    "serialize_public",
    "serialize_secret",
]
