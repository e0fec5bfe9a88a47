"""The blob store: de-identified instances as encrypted records of per-worker pack files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from storage.blobs import PACK_DIR, BlobStore
from storage.errors import IntegrityError, StorageError

KEY = bytes(range(32))


def test_a_batch_goes_to_one_pack_and_reads_back(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", KEY)
    datas = [os.urandom(1000 + 4096 * i) for i in range(5)] + [b"same", b"same"]
    refs = blobs.put_many(datas)
    assert len(set(refs)) == 7  # a record each, even for equal bytes
    assert [blobs.get(ref) for ref in refs] == datas
    assert all(blobs.exists(ref) for ref in refs)
    # One pack file for the batch, and nothing else in the store: no file per blob.
    assert [p.parent.name for p in (tmp_path / "blobs").rglob("*") if p.is_file()] == [PACK_DIR]
    assert blobs.put(b"one more").split("@")[0] == refs[0].split("@")[0]  # the same pack


def test_blobs_are_encrypted_and_bound_to_their_key_and_place(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", KEY)
    marker = b"DICM de-identified bytes " * 40
    [ref] = blobs.put_many([marker])
    [pack] = (tmp_path / "blobs" / PACK_DIR).iterdir()
    assert b"de-identified bytes" not in pack.read_bytes()
    with pytest.raises(IntegrityError, match="blob store item failed authentication"):
        BlobStore(tmp_path / "blobs", bytes(32)).get(ref)
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 1  # one bit of the ciphertext
    pack.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        blobs.get(ref)


def test_deleted_blobs_are_gone_and_the_others_stay(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs", KEY)
    refs = blobs.put_many([b"a" * 5000, b"b" * 5000, b"c" * 5000])
    blobs.delete_many(refs[:2])
    blobs.delete_many(refs[:1])  # already gone: no error
    assert [blobs.exists(ref) for ref in refs] == [False, False, True]
    assert blobs.get(refs[2]) == b"c" * 5000
    with pytest.raises(StorageError):
        blobs.get(refs[0])


@pytest.mark.parametrize("layout", ["ab/<digest>", "ab/cd/<digest>"])
def test_blobs_an_earlier_build_stored_as_files_are_still_read(
    tmp_path: Path, layout: str
) -> None:
    root = tmp_path / "blobs"
    old = b"stored by an earlier build"
    digest = hashlib.sha256(old).hexdigest()
    folder = root / digest[:2] if layout == "ab/<digest>" else root / digest[:2] / digest[2:4]
    folder.mkdir(parents=True)
    (folder / digest).write_bytes(old)
    blobs = BlobStore(root, KEY)
    assert blobs.exists(digest) and blobs.get(digest) == old
    (folder / digest).write_bytes(b"altered")
    with pytest.raises(IntegrityError, match="does not match its digest"):
        blobs.get(digest)
    blobs.delete_many([digest])
    assert not blobs.exists(digest)
