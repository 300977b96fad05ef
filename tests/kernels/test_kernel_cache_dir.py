"""The C kernels' cache folder (issue #26): its libraries are loaded and run, so a folder
others may write to, or that another user owns (a /tmp/pagedserve-kernels-<uid> made
first by someone else), is refused rather than trusted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pagedserve.kernels.native_build import NativeBuildError, cache_dir


def test_a_private_folder_of_ours_is_used_and_a_missing_one_is_created_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "made" / "here"
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(folder))
    assert cache_dir() == folder
    assert folder.stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757])
def test_a_folder_others_may_write_to_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: int) -> None:
    folder = tmp_path / "shared"
    folder.mkdir()
    folder.chmod(mode)
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(folder))
    with pytest.raises(NativeBuildError, match="others may write"):
        cache_dir()


def test_a_folder_another_user_owns_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    if os.getuid() == 0:
        os.chown(folder, 65534, 65534)  # nobody's
        expected = "belongs to uid 65534"
    else:  # an unprivileged user cannot give a folder away: take one that is root's
        folder = Path("/")
        expected = "belongs to uid 0"
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(folder))
    with pytest.raises(NativeBuildError, match=expected):
        cache_dir()


def test_the_temporary_fallback_made_by_someone_else_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # No configured folder, the user's cache unwritable: the per-user /tmp folder is next,
    # and an attacker made it first, open to all.
    monkeypatch.delenv("PAGEDSERVE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-cache-here")
    monkeypatch.setattr("tempfile.gettempdir", lambda: str(tmp_path))
    planted = tmp_path / f"pagedserve-kernels-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(NativeBuildError, match="no writable folder of this user's"):
        cache_dir()
