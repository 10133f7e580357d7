"""Model weights: open_clip pretrained tags or local files for model.pretrained, one-line errors
without a network, and open_clip's "initialized randomly" warning kept out of geomlab's output."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest

import geomlab.models  # noqa: F401  (registers geomlab's model configs with open_clip)
from geomlab import train
from geomlab.models import create_model, pretrained_kind

ROOT = Path(__file__).resolve().parents[1]


def test_pretrained_is_a_tag_of_the_model_or_a_file(tmp_path):
    tags = open_clip.list_pretrained_tags_by_model("ViT-B-32")
    assert "openai" in tags and "laion2b_s34b_b79k" in tags
    assert pretrained_kind("ViT-B-32", "openai") == "tag" and pretrained_kind("ViT-B-32", "") == ""
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    assert pretrained_kind("geomlab-tiny", str(weights)) == "file"
    with pytest.raises(ValueError, match="geomlab-tiny has no open_clip pretrained tags"):
        pretrained_kind("geomlab-tiny", "openai")


@pytest.mark.parametrize("args, words", [
    (["--pretrained", "nosuchtag", "model.name=ViT-B-32"], ["model.pretrained", "'nosuchtag'", "ViT-B-32",
                                                            "openai", "laion2b_s34b_b79k", "datacomp_xl_s13b_b90k"]),
    (["--pretrained", "openai"], ["model.pretrained", "geomlab-tiny has no open_clip pretrained tags", "file"]),
    (["--pretrained", "/nonexistent/weights.pt"], ["model.pretrained", "/nonexistent/weights.pt does not exist"]),
])
def test_an_unknown_tag_lists_the_models_tags(tmp_path, capsys, args, words):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_a_tag_that_cannot_be_downloaded_is_one_line(tmp_path):
    """Offline with an empty cache: open_clip is handed the tag, its download fails at once, and the
    error names the tag and says how to pass a local file. Nothing is downloaded."""
    cache = tmp_path / "hf"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(cache), HF_HUB_CACHE=str(cache / "hub"),
               XDG_CACHE_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "geomlab.train", "--pretrained", "openai", "--out", str(out),
                        "model.name=ViT-B-32", "data.shapes.domains=2", "data.shapes.train_size=8", "data.probe_size=8"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("geomlab.train: error:") and "'openai'" in err and "ViT-B-32" in err, err
    assert "--pretrained PATH" in err and "huggingface.co/timm/vit_base_patch32_clip_224.openai" in err, err
    assert not out.exists() and not [p for p in cache.rglob("*") if p.is_file() and p.stat().st_size > 1 << 20]


def test_an_unreachable_hub_fails_at_once_offline_and_offline_mode_is_undone(monkeypatch):
    """Online mode, but the hub's host refuses connections: the probe finds it unreachable, the hub
    client runs in offline mode for the one call (no retries: nothing is cached, so it fails at
    once) and the error says why; afterwards the client is back in online mode."""
    from huggingface_hub import constants as hub

    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setattr(hub, "HF_HUB_CACHE", "/nonexistent/geomlab-test-cache")
    with pytest.raises(ValueError, match=r"127\.0\.0\.1:9 cannot be reached and they are not in the local cache"):
        create_model("ViT-B-32", "openai")
    assert hub.HF_HUB_OFFLINE is False


def test_open_clips_random_init_warning_is_dropped_only_around_geomlabs_call(caplog):
    caplog.set_level(logging.WARNING)
    open_clip.create_model("geomlab-tiny")   # open_clip on its own says it
    said = [r for r in caplog.records if r.getMessage().startswith("No pretrained weights loaded")]
    assert len(said) == 1
    caplog.clear()
    create_model("geomlab-tiny")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]
    assert not logging.getLogger().filters   # the filter was scoped to the call
    logging.getLogger().warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")
    assert len(caplog.records) == 1


def test_a_local_file_is_loaded_by_geomlab(tmp_path, caplog):
    import torch
    caplog.set_level(logging.WARNING)
    source, _, _ = create_model("geomlab-tiny")
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.state_dict(), "name": "geomlab-tiny"}, path)
    model, transforms, _ = create_model("geomlab-tiny", pretrained=str(path))
    assert pretrained_kind("geomlab-tiny", str(path)) == "file"
    for (k, a), (_, b) in zip(source.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert set(transforms) == {"train", "val"}
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_cached_tokenizer_equals_open_clips_and_stays_bounded():
    import torch

    from geomlab.models import CachedTokenizer
    plain = open_clip.get_tokenizer("geomlab-tiny")
    cached = CachedTokenizer(plain, capacity=3)
    texts = ["a red circle", "a blue square", "a red circle", "zzz unseen words", "a blue square"]
    assert torch.equal(cached(texts), plain(texts))
    assert torch.equal(cached(texts[::-1]), plain(texts[::-1]))  # served from the memo, same rows
    assert torch.equal(cached(["one", "two", "three", "four"]), plain(["one", "two", "three", "four"]))
    assert len(cached.rows) == 3
    assert torch.equal(cached("a red circle"), plain("a red circle"))
    assert cached.context_length == plain.context_length
