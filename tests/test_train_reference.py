"""The cached default chat model: trained once into GSA_HOME's cache, atomically, then reused."""

from __future__ import annotations

import pytest
from _train_corpus import MICRO, write_corpus
from gsa_train import reference


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GSA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_trains_once_then_reuses_the_cache(tmp_path, home, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    fast = {**MICRO, "corpus": str(corpus), "steps": 3}
    del fast["progress"]
    path = reference.default_chat_model(progress=False, **fast)
    assert path == home / "cache" / "models" / reference.CHAT_MODEL_NAME and reference.is_cached(path)
    assert [p.name for p in path.parent.iterdir()] == [reference.CHAT_MODEL_NAME]  # no temp folder left
    stamp = (path / "model.safetensors").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr("gsa_train.loop.train", fail)
    assert reference.default_chat_model(progress=False, **fast) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_interrupted_run_leaves_no_cache(tmp_path, home, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("gsa_train.loop.train", boom)
    with pytest.raises(KeyboardInterrupt):
        reference.default_chat_model(progress=False, corpus=str(write_corpus(tmp_path / "c")))
    models = home / "cache" / "models"
    assert not reference.is_cached() and list(models.iterdir()) == []


def test_the_recipe_is_valid():
    from gsa_train.loop import TrainSettings

    s = TrainSettings.build(**reference.CHAT_SETTINGS, out="x")
    assert s.layout == "tiny" and s.attention == "gsa" and s.corpus == "stdlib"
    assert s.gsa["backend"] == "kernel" and s.gsa["bank"]["n_splats"] == 64
