"""Every received chunk is checked before use, on both sides, by one function.

The coordinator (``load``, ``load_file``, ``receive_cts``) and a participant
(``decrypt``, ``receive_plain``) refuse a chunk whose SEAL header or ciphertext
fields differ from what hedrl sends, with a CiphertextError naming the field.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import RecordDict

from protocol.codec import receive_cts, receive_plain
from protocol.errors import CiphertextError
from protocol.records import write_vector
from protocol.wire import make_header
from tests.helpers import wire_expect
from tests.seal_bytes import (
    COMPR_NONE,
    COMPR_ZLIB,
    SealCiphertext,
    seal_header,
)

NAN = float("nan")


@pytest.fixture(scope="module")
def real(ckks_pair, ps) -> tuple[bytes, SealCiphertext, np.ndarray]:
    """A participant's chunk at the top level, its fields, its values."""
    part, coord, _, _ = ckks_pair
    values = np.linspace(-1, 1, ps.slots)
    chunk = part.encrypt(values)
    return chunk, SealCiphertext.of(coord.load(chunk, level=ps.depth).data), values


FIELDS = [
    ({"scale": NAN}, r"ciphertext scale nan, expected 2\^35"),
    ({"scale": float("inf")}, r"ciphertext scale inf, expected 2\^35"),
    ({"scale": -(2.0**35)}, r"ciphertext scale -34359738368.0, expected 2\^35"),
    ({"scale": 2.0**35 * (1 + 2**-52)}, r"x1.0000000000000002 of Δ\), expected"),
    ({"scale": 2.0**36}, r"scale 2\^36.0000000 \(x2.0 of Δ\), expected 2\^35"),
    ({"ntt": 0}, "ciphertext not in NTT form, expected NTT form"),
]


@pytest.mark.parametrize(("fields", "match"), FIELDS)
def test_forged_field_refused_on_both_sides(
    ckks_pair, ps, real, tmp_path, fields, match
):
    """A ciphertext whose scale is not exactly Δ (NaN, ±inf, Δ(1+2^-52), 2Δ) or
    that is not in NTT form is refused by the coordinator (bytes, file and
    record) and by a participant before decryption (chunk and record)."""
    part, coord, fp, _ = ckks_pair
    chunk = real[1].replace(**fields).chunk()
    exp = wire_expect(ps, fp)
    rd = RecordDict()
    write_vector(rd, "gradient", make_header(exp, value_count=10, round_=1), [chunk])
    (tmp_path / "c").write_bytes(chunk)
    for use in (
        lambda: coord.load(chunk, level=ps.depth),
        lambda: coord.load_file(tmp_path / "c", level=ps.depth),
        lambda: receive_cts(coord, rd, "gradient", exp),
        lambda: part.decrypt(chunk, level=ps.depth),
        lambda: receive_plain(part, rd, "gradient", exp),
    ):
        with pytest.raises(CiphertextError, match=match):
            use()


def test_unforged_reencoding_is_accepted(ckks_pair, ps, real):
    """The re-encoded chunk with no field changed (uncompressed or as stored
    zstd blocks) loads and decrypts to the original values: the refusals above
    come from the forged field alone."""
    part, coord, _, _ = ckks_pair
    chunk, fields, values = real
    for compr in (COMPR_NONE, 2):
        again = fields.chunk(compr)
        assert coord.load(again, level=ps.depth).level == ps.depth
        got = part.decrypt(again, level=ps.depth)
        np.testing.assert_allclose(got, part.decrypt(chunk, level=ps.depth), atol=0)
        np.testing.assert_allclose(got, values, atol=1e-6)


def test_parms_id_and_level_refused(ckks_pair, ps, real):
    """Another level's parms_id, or a chunk at another level than expected, is
    refused (SEAL itself refuses a parms_id that does not match the moduli)."""
    part, coord, _, _ = ckks_pair
    other = tuple(int(w) for w in coord._parms_by_level[0])
    chunk = real[1].replace(parms_id=other).chunk()
    with pytest.raises(CiphertextError, match="is not a ciphertext of parameter"):
        coord.load(chunk, level=ps.depth)
    with pytest.raises(CiphertextError, match="at level 3, expected level 0"):
        part.decrypt(real[0], level=0)


@pytest.mark.parametrize(
    ("header", "match"),
    [
        ({"magic": 0xA15F}, "SEAL header magic 0xA15F, expected 0xA15E"),
        ({"header_size": 17}, "SEAL header header size 17, expected 16"),
        ({"version": (3, 6)}, r"SEAL header version 3.6, expected \d+\.\d+"),
        ({"reserved": 1}, "SEAL header reserved 1, expected 0"),
        ({"compr": COMPR_ZLIB}, r"compr_mode 1, expected 0 \(none\), 2 \(zstd\)"),
        ({"size": 1}, "SEAL header size 1, expected"),
    ],
)
def test_seal_header_checked_before_seal_parses(ckks_pair, ps, real, header, match):
    """A chunk whose SEAL header differs from what SEAL's save writes is
    refused before SEAL reads it (both sides), naming the header field."""
    part, coord, _, _ = ckks_pair
    chunk = real[0]
    fields = {"compr": chunk[5], "size": len(chunk), **header}
    compr, size = fields.pop("compr"), fields.pop("size")
    forged = seal_header(size, compr, **fields) + chunk[16:]
    for use in (
        lambda: coord.load(forged, level=ps.depth),
        lambda: part.decrypt(forged, level=ps.depth),
    ):
        with pytest.raises(CiphertextError, match=match):
            use()


def test_plain_twin_decrypt_checks_level_and_size(plain, ps):
    """The plaintext twin's decrypt checks its level byte and size like load."""
    chunk = plain.encrypt(np.ones(ps.slots))
    assert plain.decrypt(chunk, level=ps.depth).shape == (ps.slots,)
    with pytest.raises(CiphertextError, match="expected level 0, received level 3"):
        plain.decrypt(chunk, level=0)
    with pytest.raises(CiphertextError, match="received 8"):
        plain.decrypt(chunk[:8], level=ps.depth)
