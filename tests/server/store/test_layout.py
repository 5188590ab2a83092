"""build_once: a folder appears complete with its manifest, or not at all; finished work is not redone."""

from __future__ import annotations

from pathlib import Path

import pytest

from specserve.server.store.layout import build_once
from specserve.server.store.manifest import MANIFEST_NAME, is_complete, read_manifest


def _writer(calls: list[str], content: str = "{}"):
    """A builder that records its call and writes a one-file model folder."""

    def build(work: Path, out: Path) -> None:
        calls.append(content)
        out.mkdir()
        (out / "config.json").write_text(content)

    return build


def test_builds_once_then_returns_the_finished_folder(tmp_path: Path) -> None:
    target, calls = tmp_path / "models" / "m", []
    assert build_once(target, "m", "sha256:aa", "float32", _writer(calls)) == target
    assert build_once(target, "m", "sha256:aa", "float32", _writer(calls)) == target
    assert calls == ["{}"]
    manifest = read_manifest(target)
    assert manifest.files == (("config.json", 2),) and manifest.source == "sha256:aa"


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"

    def build(work: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise RuntimeError("converter crashed")

    with pytest.raises(RuntimeError, match="converter crashed"):
        build_once(target, "m", "sha256:aa", "float32", build)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir()] == [".m.lock"]


def test_unfinished_or_outdated_folder_is_rebuilt(tmp_path: Path) -> None:
    target, calls = tmp_path / "models" / "m", []
    target.mkdir(parents=True)
    (target / "config.json").write_text("half-written")  # no manifest: never finished
    build_once(target, "m", "sha256:aa", "float32", _writer(calls, "v1"))
    build_once(target, "m", "sha256:bb", "float32", _writer(calls, "v2"))  # catalogue pin changed
    assert calls == ["v1", "v2"] and (target / "config.json").read_text() == "v2"
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_missing_or_resized_file_makes_a_folder_incomplete(tmp_path: Path) -> None:
    target = tmp_path / "m"
    build_once(target, "m", "sha256:aa", "float32", _writer([]))
    assert is_complete(target, "sha256:aa") and not is_complete(target, "sha256:other")
    (target / "config.json").write_text("{...}")
    assert not is_complete(target, "sha256:aa")
    (target / MANIFEST_NAME).unlink()
    assert not is_complete(target, "sha256:aa")


def test_leftovers_of_killed_builds_are_removed(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    stale = target.parent / ".m.tmp-dead"
    (stale / "out").mkdir(parents=True)
    build_once(target, "m", "sha256:aa", "float32", _writer([]))
    assert not stale.exists() and is_complete(target, "sha256:aa")
