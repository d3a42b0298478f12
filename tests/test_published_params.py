"""The published weights in params/published/ are the files their README lists, byte for byte
(SHA-256 and size), and nothing else lies in that folder."""

from __future__ import annotations

import hashlib
import re

from conftest import PUBLISHED

ROW = re.compile(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \| (\d+) \|", re.MULTILINE)


def listed() -> dict[str, tuple[str, int]]:
    """README rows: file name -> (SHA-256, size in bytes)."""
    text = (PUBLISHED / "README.md").read_text()
    return {name: (digest, int(size)) for name, digest, size in ROW.findall(text)}


def test_readme_lists_every_file():
    on_disk = {p.name for p in PUBLISHED.iterdir() if p.name != "README.md"}
    assert set(listed()) == on_disk == {"a.eqx", "b.eqx", "c.eqx", "d.eqx", "manifest.json"}


def test_files_match_their_checksums():
    for name, (digest, size) in listed().items():
        data = (PUBLISHED / name).read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == digest, f"{name} differs from the published file"
