from pathlib import Path

from gsa_data.paths import HOME_ENV, cache_dir, data_dir


def test_gsa_home_overrides_both_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / "data"
    assert cache_dir() == tmp_path / "home" / "cache"
    assert data_dir().is_dir() and cache_dir().is_dir()


def test_default_folders_are_per_user_and_distinct(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(HOME_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "share"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cachehome"))
    assert data_dir() == tmp_path / "share" / "gsa"
    assert cache_dir() == tmp_path / "cachehome" / "gsa"
