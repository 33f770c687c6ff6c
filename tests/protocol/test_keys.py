"""Key material: keygen files, keyless coordinator, fingerprints, one key per run."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from protocol import keys
from protocol.errors import KeyMaterialError, SecretKeyRefused
from protocol.params import get_param_set


def _keygen(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "protocol.keygen", *args], capture_output=True, text=True
    )


def test_keygen_writes_secret_0600_and_keyless_coordinator(tmp_path):
    """hedrl-keygen: participant.ctx is 0600, coordinator.ctx holds no secret key."""
    out = tmp_path / "k"
    res = _keygen("--param-set", "8k-35x3", "--out", str(out))
    assert res.returncode == 0, res.stderr
    mode = stat.S_IMODE((out / "participant.ctx").stat().st_mode)
    assert mode == 0o600
    fp = res.stdout.split("fingerprint:")[1].strip()
    ps = get_param_set("8k-35x3")
    coord, fp_c = keys.coordinator_backend(
        (out / "coordinator.ctx").read_bytes(), ps, "ckks"
    )
    assert fp_c == fp
    assert not coord.ctx.is_private() and not coord.ctx.has_secret_key()
    assert not coord.ctx.has_galois_keys()
    _, fp_p = keys.participant_backend(out / "participant.ctx", ps, "ckks")
    assert fp_p == fp


def test_keygen_refuses_overwrite_without_force(tmp_path):
    """A second keygen into the same directory fails unless --force is given."""
    out = tmp_path / "k"
    assert _keygen("--out", str(out)).returncode == 0
    first = (out / "participant.ctx").read_bytes()
    res = _keygen("--out", str(out))
    assert res.returncode == 2 and "refusing to overwrite" in res.stderr
    assert (out / "participant.ctx").read_bytes() == first
    assert _keygen("--out", str(out), "--force").returncode == 0
    assert (out / "participant.ctx").read_bytes() != first


def test_coordinator_context_cannot_decrypt(ckks_pair, ps):
    """The evaluation context is not private and its decrypt raises."""
    part, coord, _, _ = ckks_pair
    chunk = part.encrypt(np.ones(ps.slots))
    ct = coord.load(chunk, level=ps.depth)
    assert not coord.ctx.is_private()
    with pytest.raises(ValueError, match="Secret key"):
        coord.ctx.secret_key()  # TenSEAL has none to hand out
    with pytest.raises(KeyMaterialError, match="participant's context"):
        coord.decrypt_ct(ct)


def test_coordinator_refuses_secret_context(ckks_pair, ps):
    """Loading participant.ctx as the coordinator's context raises SecretKeyRefused."""
    _, _, _, d = ckks_pair
    with pytest.raises(SecretKeyRefused, match="holds a secret key"):
        keys.coordinator_backend((d / "participant.ctx").read_bytes(), ps, "ckks")


def test_coordinator_refuses_plain_twin_secret(ps):
    """The plaintext twin's stand-in is refused the same way when marked secret."""
    sec, pub, _ = keys.generate(ps, "plain")
    with pytest.raises(SecretKeyRefused):
        keys.coordinator_backend(sec, ps, "plain")
    keys.coordinator_backend(pub, ps, "plain")


def test_backend_mismatch_in_context_refused(ps, tmp_path):
    """A plain stand-in offered to a ckks run (and the reverse) is refused."""
    sec, pub, _ = keys.generate(ps, "plain")
    with pytest.raises(KeyMaterialError, match="expected a CKKS context"):
        keys.coordinator_backend(pub, ps, "ckks")


def _provision(args: tuple[str, int]) -> tuple[str, bool]:
    directory, _ = args
    info = keys.provision(Path(directory), get_param_set("8k-35x3"), "ckks")
    return info.fingerprint, info.created


def test_provision_race_creates_exactly_one_key(tmp_path):
    """Four processes provisioning the same run directory at once make one key."""
    d = tmp_path / "run-1"
    ctx = mp.get_context("spawn")
    with ctx.Pool(4) as pool:
        results = pool.map(_provision, [(str(d), i) for i in range(4)])
    fps = {fp for fp, _ in results}
    assert len(fps) == 1
    assert sum(created for _, created in results) == 1
    ps = get_param_set("8k-35x3")
    _, fp = keys.participant_backend(d / "participant.ctx", ps, "ckks")
    assert fps == {fp}


def test_participant_context_loads_without_relin_keys_but_exports_them(ps):
    """Participants never multiply ciphertexts, so their context loads without
    relinearisation keys (deployment: every message is a fresh process); the
    evaluation context made from it still carries them and can multiply."""
    from protocol import ckks
    from protocol.backend import Ct

    sec, _, _ = keys.generate(ps, "ckks")
    sc = ckks.load_secret_context(sec)
    assert sc.ctx.is_private() and not sc.ctx.has_relin_keys()
    part = ckks.CkksBackend(ps, sc.ctx, sc.relin_keys)
    pub = ckks.load_public_context(ckks.serialize_public(sc.ctx, sc.relin_keys), ps)
    assert pub.has_relin_keys() and not pub.is_private()
    coord = ckks.CkksBackend(ps, pub)
    x = coord.load(part.encrypt(np.full(ps.slots, 0.5)), level=ps.depth)
    sq = coord.mul(x, x)
    got = part.decrypt_ct(coord.to_bottom(sq))
    assert np.max(np.abs(got - 0.25)) < 1e-5
    with pytest.raises(KeyMaterialError, match="relinearisation"):
        part.mul(Ct(x.data, x.level), Ct(x.data, x.level))


def test_key_replaced_at_the_same_path_is_loaded_again(tmp_path, ps):
    """The per-process key cache must not serve a key whose file was replaced
    (rotated with --force, or a run directory started over)."""
    first = keys.write_keys(tmp_path, ps, "ckks", force=True)
    be1, fp1 = keys.participant_backend(tmp_path / keys.PARTICIPANT_FILE, ps, "ckks")
    assert fp1 == first.fingerprint
    second = keys.write_keys(tmp_path, ps, "ckks", force=True)
    assert second.fingerprint != first.fingerprint
    be2, fp2 = keys.participant_backend(tmp_path / keys.PARTICIPANT_FILE, ps, "ckks")
    assert fp2 == second.fingerprint
    # the loaded key is the new one: it decrypts what the new key encrypts,
    # which the old one cannot
    x = np.linspace(-1, 1, ps.slots)
    chunk = be2.encrypt(x)
    assert np.abs(be2.decrypt(chunk, level=ps.depth)[: ps.slots] - x).max() < 1e-4
    assert np.abs(be1.decrypt(chunk, level=ps.depth)[: ps.slots] - x).max() > 1.0


def test_fingerprint_covers_public_and_relinearisation_keys(ckks_pair, ps):
    """Both sides hash SEAL's serialisation of the public key and of the
    relinearisation keys; each serialisation is the same after load → save, so
    the participant's stored keys and the coordinator's loaded ones agree, and
    other relinearisation keys (same public key) give another fingerprint."""
    from protocol import ckks

    _, coord, fp, d = ckks_pair
    sc = ckks.load_secret_context((d / "participant.ctx").read_bytes())
    pub = (d / "coordinator.ctx").read_bytes()
    assert ckks.relin_key_bytes(coord.ctx) == sc.relin_keys
    assert ckks.relin_key_bytes(ckks.load_public_context(pub, ps)) == sc.relin_keys
    assert ckks._save_bytes(coord.ctx.public_key().data) == ckks._save_bytes(
        sc.ctx.public_key().data
    )
    assert ckks.serialize_public(sc.ctx, sc.relin_keys) == pub  # canonical
    assert ckks.fingerprint(sc.ctx, ps.id, sc.relin_keys) == fp
    other = sc.ctx.copy()
    other.generate_relin_keys()  # same secret and public key, new relin keys
    other_rk = ckks.relin_key_bytes(other)
    assert other_rk != sc.relin_keys
    _, fp_other = keys.coordinator_backend(
        ckks.serialize_public(sc.ctx, other_rk), ps, "ckks"
    )
    assert fp_other != fp
    assert ckks.fingerprint(sc.ctx, ps.id, other_rk) == fp_other


def test_participant_context_of_protocol_3_refused(ps):
    """A participant.ctx without stored relinearisation keys (protocol 3) is
    refused with a KeyMaterialError that says what to do."""
    from protocol import ckks

    ctx = ckks.create_context(ps)
    old = ctx.serialize(save_secret_key=True, save_relin_keys=False)
    with pytest.raises(KeyMaterialError, match="provision a new key"):
        ckks.load_secret_context(old)


def test_evaluation_context_of_other_parameters_refused(ps):
    """An evaluation context of another parameter set (same N, other primes)
    is refused naming the field."""
    other = get_param_set("8k-40x2")
    _, pub, _ = keys.generate(other, "ckks")
    with pytest.raises(KeyMaterialError, match="global scale 1099511627776.0, exp"):
        keys.coordinator_backend(pub, ps, "ckks")


def _flip_positions(data: bytes, ps) -> list[int]:
    """≥ 200 byte positions over all of coordinator.ctx: its first 128 bytes
    (TenSEAL's record headers, the encryption parameters, the public key's
    start), the 16 bytes of the flags and global-scale fields between the
    public and the relinearisation keys, and 160 spread evenly over the rest
    (public key, then relinearisation keys: the last ~80 % of the file)."""
    import struct

    scale_at = data.index(b"\x19" + struct.pack("<d", ps.scale))
    assert data[scale_at - 2 : scale_at] == b"\x10\x07"  # auto_* flags, all on
    fields = range(scale_at - 4, scale_at + 12)
    spread = np.linspace(128, len(data) - 1, 160).astype(int)
    positions = sorted({*range(128), *fields, *spread.tolist()})
    assert len(positions) >= 200 and sum(p > scale_at + 9 for p in positions) > 100
    return positions


def _flips(data: bytes, fp: str, ps, every_bit: bool) -> dict[str, object]:
    """Load ``data`` (coordinator.ctx of fingerprint ``fp``) with single bits
    flipped; count the outcomes (and list the flips that kept ``fp``)."""
    counts: dict[str, object] = {"refused": 0, "other fingerprint": 0}
    same: list[tuple[int, int]] = []
    for pos in _flip_positions(data, ps):
        for bit in range(8) if every_bit else [pos % 8]:
            flipped = bytearray(data)
            flipped[pos] ^= 1 << bit
            try:
                _, got = keys.coordinator_backend(bytes(flipped), ps, "ckks")
            except KeyMaterialError:
                counts["refused"] += 1  # type: ignore[operator]
                continue
            if got == fp:
                same.append((pos, bit))
            else:
                counts["other fingerprint"] += 1  # type: ignore[operator]
    counts["same fingerprint at (byte, bit)"] = same
    return counts


@pytest.mark.slow  # a sweep: CI runs it, the fast loop does not
def test_bit_flips_in_evaluation_context_change_fingerprint(ckks_pair, ps):
    """One bit flipped at each of ≥ 200 positions over the whole coordinator.ctx
    (relinearisation keys included): each flip is refused (KeyMaterialError)
    or loads with another fingerprint — never the same fingerprint."""
    _, _, fp, d = ckks_pair
    counts = _flips((d / "coordinator.ctx").read_bytes(), fp, ps, every_bit=False)
    assert counts["same fingerprint at (byte, bit)"] == [], counts
    assert counts["refused"] + counts["other fingerprint"] >= 200, counts


@pytest.mark.slow
def test_every_bit_flip_at_sampled_positions_changes_fingerprint(ckks_pair, ps):
    """As above with all 8 bits of every sampled byte (≈ 2,300 loads, ~1 min)."""
    _, _, fp, d = ckks_pair
    counts = _flips((d / "coordinator.ctx").read_bytes(), fp, ps, every_bit=True)
    assert counts["same fingerprint at (byte, bit)"] == [], counts


@pytest.mark.parametrize("bit", [4, 6])
def test_damaged_public_key_tag_refused_before_tenseal_parses(ckks_pair, ps, bit):
    """coordinator.ctx whose public-key field number is damaged by one bit
    (the key then sits in an unknown field) crashed TenSEAL (SIGSEGV); TenSEAL's
    record is checked first and the context refused with KeyMaterialError."""
    from protocol import seal_format

    data = (ckks_pair[3] / "coordinator.ctx").read_bytes()
    rec = seal_format.TenSEALRecord()
    rec.ParseFromString(data)
    n = len(rec.public_context.SerializeToString())
    varint = bytearray()
    while True:
        varint.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            break
    at = data.index(b"\x12" + bytes(varint) + b"\x0a") + 1 + len(varint)
    damaged = bytearray(data)
    damaged[at] ^= 1 << bit
    with pytest.raises(KeyMaterialError, match="as TenSEAL writes it"):
        keys.coordinator_backend(bytes(damaged), ps, "ckks")


def test_participant_key_of_other_parameters_refused(tmp_path, ps):
    """A participant key made for another parameter set is refused naming both
    sets of primes."""
    other = get_param_set("8k-40x2")
    info = keys.write_keys(tmp_path / "k", other, "ckks", force=False)
    with pytest.raises(KeyMaterialError) as err:
        keys.participant_backend(info.participant_path, ps, "ckks")
    assert str(err.value) == (
        "key is CKKS with N=8192 and primes of [60, 40, 40, 60] bits; parameter "
        "set '8k-35x3' is CKKS with N=8192 and primes of [60, 35, 35, 35, 53] bits"
    )


def test_participant_file_framing_refuses_every_cut_and_flip():
    """participant.ctx's framing (protocol/keyfile.py) round-trips, and every
    truncation or flipped byte of it is a KeyMaterialError before TenSEAL sees
    a byte."""
    from protocol import keyfile

    data = keyfile.frame_secret(b"context" * 5, b"relin")
    assert keyfile.unframe_secret(data) == (b"context" * 5, b"relin")
    for cut in range(len(data)):
        with pytest.raises(KeyMaterialError):
            keyfile.unframe_secret(data[:cut])
    for pos in range(len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x01
        with pytest.raises(KeyMaterialError):
            keyfile.unframe_secret(bytes(flipped))
    # a consistent checksum over a wrong length is refused too
    bad = keyfile.PARTICIPANT_MAGIC + keyfile._LENGTH.pack(10**6) + b"context" * 5
    with pytest.raises(KeyMaterialError, match="bytes follow the length"):
        keyfile.unframe_secret(bad + b"relin" + hashlib.sha256(bad + b"relin").digest())
