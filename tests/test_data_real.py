"""Real image-text data (issue 5): COCO, Karpathy JSON, CSV and webdataset readers, phase
builders, multi-caption retrieval, bad input. Tiny datasets of real JPEG/PNG files in tmp_path."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import geomlab.models  # noqa: F401  (registers geomlab's model configs with open_clip)
from geomlab import train
from geomlab.config import ConfigError, load_config
from geomlab.data import DataError, build_stream

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["square", "circle", "stripe", "dot"]


def image_bytes(i: int, fmt: str = "JPEG", size=(40, 36)) -> bytes:
    from PIL import Image
    rng = np.random.default_rng(i)
    a = np.zeros((size[1], size[0], 3), np.uint8) + rng.integers(0, 255, 3, dtype=np.uint8)
    a[i % 7: i % 7 + 12, (3 * i) % 20: (3 * i) % 20 + 14] = rng.integers(0, 255, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def captions(i: int, n: int = 5) -> list[str]:
    return [f"a {WORDS[i % 8]} {SHAPES[(i // 8) % 4]} number {i} view {j}" for j in range(n)]


def write_image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(i, "PNG" if path.suffix == ".png" else "JPEG"))


def make_coco(root: Path, n: int = 10, start: int = 0) -> None:
    images, anns = [], []
    for i in range(start, start + n):
        name = f"{i:012d}.jpg"
        write_image(root / "coco" / "train2017" / name, i)
        images.append({"id": 1000 + i, "file_name": name, "width": 40, "height": 36})
        anns += [{"id": 10 * i + j, "image_id": 1000 + i, "caption": c} for j, c in enumerate(captions(i))]
    (root / "coco" / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "coco" / "annotations" / "captions_train2017.json").write_text(
        json.dumps({"info": {}, "images": images, "annotations": anns}))


def make_karpathy(root: Path, n_train: int = 12, n_test: int = 6) -> None:
    images = []
    for k in range(n_train + n_test):
        i = 100 + k
        name = f"{i}.{'png' if k % 2 else 'jpg'}"     # real JPEG and PNG files
        write_image(root / "flickr30k" / "images" / name, i)
        images.append({"filename": name, "imgid": k, "split": "train" if k < n_train else "test",
                       "sentids": list(range(5 * k, 5 * k + 5)),
                       "sentences": [{"raw": c, "tokens": c.split(), "imgid": k} for c in captions(i)]})
    (root / "flickr30k" / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def make_csv(root: Path, n: int = 8, bad: str | None = None, name: str = "train.csv") -> Path:
    rows = ["filepath,title,domain"]
    for k in range(n):
        i = 200 + k
        write_image(root / "csv" / "img" / f"{i}.jpg", i)
        for c in captions(i, 2):
            rows.append(f"img/{i}.jpg,{c},{'indoor' if k % 2 else 'outdoor'}")
    path = root / "csv" / name
    path.write_text("\n".join(rows) + "\n")
    if bad == "truncated":   # an unreadable image among good ones
        data = (root / "csv" / "img" / "203.jpg").read_bytes()
        (root / "csv" / "img" / "203.jpg").write_bytes(data[: len(data) // 2])
    return path


def make_wds(root: Path, shards: int = 2, per_shard: int = 5, prefix: str = "train") -> None:
    import webdataset as wds
    (root / "wds").mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        with wds.TarWriter(str(root / "wds" / f"{prefix}-{s:03d}.tar")) as sink:
            for k in range(per_shard):
                i = 300 + (0 if prefix == "train" else 50) + s * per_shard + k
                sink.write({"__key__": f"{s:03d}{k:04d}", "jpg": image_bytes(i), "txt": "\n".join(captions(i, 3))})


def config_text(root: Path, sources: list[dict], **data) -> str:
    data = {"calibration_size": 0, **data}  # these tests' probe sources are tiny: no calibration set unless asked
    lines = ['[run]', 'name = "real"', 'strategies = ["finetune"]', '[model]', 'name = "geomlab-tiny"',
             '[data]', 'stream = "datasets"', f'root = "{root}"', 'probe_size = 0']
    lines += [f"{k} = {json.dumps(v)}" for k, v in data.items()]
    # (these tests' phases are tiny on purpose: a batch may exceed a phase)
    lines += ['[train]', 'batch_size = 8', 'base_steps = 2', 'steps = 2', 'log_every = 1', 'eval_batch_size = 16',
              'allow_repeats = true']
    for s in sources:
        lines.append("[[data.sources]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in s.items()]
    return "\n".join(lines) + "\n"


def data_config(root: Path, sources: list[dict], **data) -> dict:
    import tomllib
    from geomlab.config import resolve
    return resolve(tomllib.loads(config_text(root, sources, **data)))["data"]


FLICKR_TEST = {"name": "flickr30k_test", "format": "karpathy", "role": "probe",
               "path": "flickr30k/dataset_flickr30k.json", "images": "flickr30k/images", "splits": ["test"]}


# ----------------------------------------------------------------------------- config

def test_sources_are_a_validated_list_of_tables(tmp_path):
    src = '[{name="a", format="csv", path="x.csv", k=2}]'
    cfg = load_config(None, [f"data.sources={src}"])
    (s,) = cfg["data"]["sources"]
    assert s["k"] == 2 and s["img_key"] == "filepath" and s["role"] == "train" and s["key_values"] == []
    assert load_config(None)["data"]["sources"] == []
    for bad, name in [('[{name="a", formt="csv"}]', "data.sources[0].formt"),
                      ('[{name="a", format="tar"}]', "data.sources[0].format"),
                      ('[{name="a", k="two"}]', "data.sources[0].k"), ("3", "data.sources")]:
        with pytest.raises(ConfigError, match=name.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, [f"data.sources={bad}"])


# ----------------------------------------------------------------------------- readers and phases

def test_readers_and_phase_builders(tmp_path):
    make_coco(tmp_path)
    make_karpathy(tmp_path)
    make_csv(tmp_path)
    make_wds(tmp_path)
    sources = [
        {"name": "coco", "format": "coco", "path": "coco/annotations/captions_train2017.json",
         "images": "coco/train2017"},
        {"name": "flickr30k", "format": "karpathy", "path": "flickr30k/dataset_flickr30k.json",
         "images": "flickr30k/images", "k": 5},
        {"name": "csv", "format": "csv", "path": "csv/train.csv", "key": "domain", "key_values": ["outdoor", "indoor"]},
        {"name": "wds", "format": "wds", "path": "wds/train-{000..001}.tar"},
        FLICKR_TEST,
    ]
    s = build_stream("datasets", data_config(tmp_path, sources), image_size=32, preprocess=None, seed=3)
    names = [p.name for p in s.phases]
    assert names == ["coco", *[f"flickr30k_{p}of5" for p in range(1, 6)], "csv_outdoor", "csv_indoor", "wds"]
    # index split: 12 images into 5 contiguous parts of equal size (+-1), every caption a pair
    fl = s.phases[1:6]
    assert [p.train.n_images for p in fl] == [2, 2, 3, 2, 3] and [len(p.train) for p in fl] == [10, 10, 15, 10, 15]
    assert fl[0].train.records[0].ref.startswith("images[0]") and fl[4].train.records[-1].ref.startswith("images[11]")
    assert [p.train.n_images for p in s.phases[6:8]] == [4, 4] and len(s.phases[6].train) == 8
    assert s.phases[8].train.n_images == 10 and len(s.phases[8].train) == 30
    img, cap, sid = s.phases[0].train[6]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and cap == captions(1)[1] and sid == 1 * 1000 + 1
    img, cap, sid = s.phases[1].train[5]   # a PNG
    assert img.shape == (3, 32, 32) and cap == captions(101)[0]
    (probe,) = s.probes
    assert probe.name == "flickr30k_test" and len(probe.ids) == 6 and len(probe.captions) == 30
    assert probe.caption_image.tolist() == [i for i in range(6) for _ in range(5)]
    assert not probe.one_caption_per_image and probe.images[0].shape == (3, 32, 32)
    info = s.info
    assert info["seed"] == 3 and info["sources"][1]["bounds"] == [0, 2, 4, 7, 9, 12]
    assert info["sources"][2]["values"] == ["outdoor", "indoor"] and not s.skipped
    json.dumps(info)  # recorded in run.json

    # a seeded permutation before the split: reproducible, and it differs from the contiguous split
    shuffled = dict(sources[1], shuffle=True)
    a, b = (build_stream("datasets", data_config(tmp_path, [shuffled, FLICKR_TEST]), image_size=32,
                         preprocess=None, seed=seed) for seed in (3, 3))
    c = build_stream("datasets", data_config(tmp_path, [shuffled, FLICKR_TEST]), image_size=32, preprocess=None, seed=4)
    order = lambda st: [r.ref for p in st.phases for r in p.train.records]  # noqa: E731
    contiguous = [r.ref for p in fl for r in p.train.records]
    assert order(a) == order(b) != order(c) and order(a) != contiguous and sorted(order(a)) == sorted(contiguous)
    assert a.info["sources"][0]["order_sha1"] != s.info["sources"][1]["order_sha1"]


def test_probe_images_must_be_held_out(tmp_path):
    make_karpathy(tmp_path)
    train_src = {"name": "f", "format": "karpathy", "path": "flickr30k/dataset_flickr30k.json",
                 "images": "flickr30k/images", "splits": ["train", "test"]}
    with pytest.raises(DataError, match="both train source"):
        build_stream("datasets", data_config(tmp_path, [train_src, FLICKR_TEST]), image_size=32, preprocess=None, seed=0)


def test_calibration_set_is_the_end_of_each_probe_part(tmp_path):
    """data.calibration_size: the last N records of a probe part are its calibration set (kind
    "calibration", the probe set's phases, every caption), the probe the first probe_size of the rest;
    a part too small for both is refused naming the source and the numbers; calibration images are
    held out of training like the probe's."""
    make_karpathy(tmp_path, n_train=4, n_test=6)   # test records: images 104..109, ordinals 0..5 in the probe source
    train_src = {"name": "flickr30k", "format": "karpathy", "path": "flickr30k/dataset_flickr30k.json",
                 "images": "flickr30k/images"}
    probe_src = dict(FLICKR_TEST, measures=["flickr30k"])
    uid = lambda p: [i % 10 ** 9 for i in p.ids.tolist()]  # noqa: E731  (ordinal in the source)

    def build(calibration_size, probe_size=0, sources=(train_src, probe_src)):
        cfg = dict(data_config(tmp_path, list(sources), calibration_size=calibration_size), probe_size=probe_size)
        return build_stream("datasets", cfg, image_size=32, preprocess=None, seed=0)

    s = build(2)
    probe, cal = s.probes
    assert (probe.name, probe.kind, cal.name, cal.kind) == ("flickr30k_test", "seen", "flickr30k_test/calibration",
                                                            "calibration")
    assert uid(probe) == [0, 1, 2, 3] and uid(cal) == [4, 5] and cal.phases == probe.phases == (0,)
    assert cal.captions == captions(108) + captions(109) and cal.caption_image.tolist() == [0] * 5 + [1] * 5
    assert [(p["name"], p["images"], p["kind"]) for p in s.info["probe_sets"]] == [
        ("flickr30k_test", 4, "seen"), ("flickr30k_test/calibration", 2, "calibration")]
    assert s.info["calibration_size"] == 2
    # probe_size: the first N before the calibration records; 0: no calibration set, the probe as before
    assert [uid(p) for p in build(2, probe_size=3).probes] == [[0, 1, 2], [4, 5]]
    assert [uid(p) for p in build(0).probes] == [[0, 1, 2, 3, 4, 5]]
    assert [uid(p) for p in build(5).probes] == [[0], [1, 2, 3, 4, 5]]
    for calibration_size, probe_size, needs in ((6, 0, 7), (2, 5, 7)):
        with pytest.raises(DataError, match=rf"data.sources\['flickr30k_test'\], probe set 'flickr30k_test': 6 "
                                            rf"records, too few for data.calibration_size = {calibration_size} .*"
                                            rf"needs {needs}"):
            build(calibration_size, probe_size)
    # a calibration image in a train source is refused like a probe image (not when no calibration set uses it)
    make_csv(tmp_path, n=4)
    (tmp_path / "csv" / "probe.csv").write_text("filepath,title\n" + "".join(
        f"img/{i}.jpg,{captions(i, 1)[0]}\n" for i in range(200, 204)))
    (tmp_path / "csv" / "also.csv").write_text(f"filepath,title\nimg/203.jpg,another caption\n")
    sources = [{"name": "also", "format": "csv", "path": "csv/also.csv"},
               {"name": "pics_test", "format": "csv", "path": "csv/probe.csv", "role": "probe"}]
    assert [uid(p) for p in build(0, probe_size=3, sources=sources).probes] == [[0, 1, 2]]
    with pytest.raises(DataError, match=r"203\.jpg: image is in both train source 'also' and probe source 'pics_test'"):
        build(1, probe_size=3, sources=sources)


def _bad_inputs(root: Path):
    """(name, sources, expected text in the error) for each kind of bad input."""
    make_karpathy(root)
    make_coco(root, n=4)
    make_csv(root, n=4)
    coco = {"name": "coco", "format": "coco", "path": "coco/annotations/captions_train2017.json",
            "images": "coco/train2017"}
    ann = json.loads((root / "coco/annotations/captions_train2017.json").read_text())
    cases = []

    ann3 = json.loads(json.dumps(ann))
    ann3["images"][2]["file_name"] = "000000000099.jpg"
    (root / "coco/annotations/missing.json").write_text(json.dumps(ann3))
    cases.append(("missing image", [dict(coco, path="coco/annotations/missing.json")],
                  ["000000000099.jpg", "image id 1002", "does not exist", "missing.json", "source 'coco'"], True))

    ann2 = json.loads(json.dumps(ann))
    ann2["annotations"][6]["caption"] = "   "
    (root / "coco/annotations/empty.json").write_text(json.dumps(ann2))
    cases.append(("empty caption", [dict(coco, path="coco/annotations/empty.json")],
                  ["empty.json", "image id 1001", "empty caption"], True))

    (root / "coco/annotations/nokeys.json").write_text(json.dumps({"images": ann["images"]}))
    cases.append(("JSON without keys", [dict(coco, path="coco/annotations/nokeys.json")],
                  ["nokeys.json", "'annotations'"], False))
    kp = json.loads((root / "flickr30k/dataset_flickr30k.json").read_text())
    del kp["images"][3]["sentences"]
    (root / "flickr30k/nosent.json").write_text(json.dumps(kp))
    cases.append(("Karpathy record without sentences",
                  [{"name": "f", "format": "karpathy", "path": "flickr30k/nosent.json", "images": "flickr30k/images"}],
                  ["nosent.json", "images[3]", "'sentences'"], False))

    csv_src = {"name": "csv", "format": "csv", "path": "csv/train.csv", "caption_key": "caption"}
    cases.append(("CSV without the column", [csv_src], ["train.csv", "'caption'", "caption_key", "'title'"], False))

    raw = (root / "csv/train.csv").read_bytes().splitlines(keepends=True)
    raw[3] = raw[3].replace(b"a ", b"\xff\xfe ", 1)
    (root / "csv/latin.csv").write_bytes(b"".join(raw))
    cases.append(("CSV text not UTF-8", [dict(csv_src, path="csv/latin.csv", caption_key="title")],
                  ["latin.csv", "line 4", "not UTF-8"], True))
    (root / "flickr30k/latin.json").write_bytes(b'{"images": [{"filename": "caf\xe9.jpg"}]}')
    cases.append(("JSON not UTF-8", [{"name": "f", "format": "karpathy", "path": "flickr30k/latin.json",
                                      "images": "flickr30k/images"}], ["latin.json", "line 1", "not UTF-8"], False))
    return cases


def test_bad_input_is_a_clear_error_or_a_counted_skip(tmp_path, capsys):
    for name, sources, words, skippable in _bad_inputs(tmp_path):
        cfg = data_config(tmp_path, [*sources, FLICKR_TEST])
        with pytest.raises(DataError) as e:
            build_stream("datasets", cfg, image_size=32, preprocess=None, seed=0)
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and all(w in msg for w in words), (name, msg)
        cfg["on_bad_sample"] = "skip"
        if skippable:
            s = build_stream("datasets", cfg, image_size=32, preprocess=None, seed=0)
            assert len(s.skipped) == 1 and s.info["skipped"] == 1, (name, s.skipped)
            assert words[0] in s.skipped[0]["file"] and "skipped" in capsys.readouterr().err
        else:  # structural problems (no record to skip) stay errors
            with pytest.raises(DataError):
                build_stream("datasets", cfg, image_size=32, preprocess=None, seed=0)


# ----------------------------------------------------------------------------- end to end

def brute_force_metrics(image: torch.Tensor, text: torch.Tensor, owner: torch.Tensor) -> dict:
    s = (image.double() @ text.double().T).numpy()          # [N, M]
    owner = owner.numpy()
    i2t = []
    for i in range(s.shape[0]):
        order = np.argsort(-s[i], kind="stable")
        i2t.append(min(int(np.nonzero(order == c)[0][0]) for c in np.nonzero(owner == i)[0]))
    t2i = []
    for c in range(s.shape[1]):
        order = np.argsort(-s[:, c], kind="stable")
        t2i.append(int(np.nonzero(order == owner[c])[0][0]))
    out = {}
    for d, r in (("image_to_text", np.array(i2t)), ("text_to_image", np.array(t2i))):
        out[f"{d}_mean_rank"] = r.mean() + 1
        for k in (1, 5, 10):
            out[f"{d}_R@{k}"] = (r < k).mean()
    # median_rank is a function of these ranks (compared exactly below); its convention for an even
    # count (torch's lower middle vs open_clip's numpy mean of the two) is geomlab.geometry's business.
    return out, np.array(i2t), np.array(t2i)


def test_train_on_every_format_then_analyze(tmp_path):
    """One CLI run over COCO (base), Flickr30K Karpathy (2 index phases), CSV (key split) and webdataset
    phases, probed on the Karpathy test split and a webdataset probe; then the analyser; the stored
    multi-caption retrieval equals a brute-force computation on the same embeddings."""
    make_coco(tmp_path, n=8)
    make_karpathy(tmp_path, n_train=8, n_test=6)
    make_csv(tmp_path, n=4)
    make_wds(tmp_path, shards=1, per_shard=4)
    make_wds(tmp_path, shards=1, per_shard=4, prefix="probe")
    sources = [
        {"name": "coco", "format": "coco", "path": "coco/annotations/captions_train2017.json", "images": "coco/train2017"},
        {"name": "flickr30k", "format": "karpathy", "path": "flickr30k/dataset_flickr30k.json",
         "images": "flickr30k/images", "k": 2},
        {"name": "csv", "format": "csv", "path": "csv/train.csv", "key": "domain"},
        {"name": "wds", "format": "wds", "path": "wds/train-000.tar"},
        FLICKR_TEST,
        {"name": "wds_probe", "format": "wds", "path": "wds/probe-000.tar", "role": "probe"},
    ]
    cfg = tmp_path / "exp.toml"
    cfg.write_text(config_text(tmp_path, sources, num_workers=1))
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "geomlab.train", "--config", str(cfg), "--out", str(out),
                        "--strategies", "modx"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["phases"] == ["coco", "flickr30k_1of2", "flickr30k_2of2", "csv_indoor", "csv_outdoor", "wds"]
    assert info["probes"] == ["flickr30k_test", "wds_probe"] and info["stream"]["stream"] == "datasets"
    assert info["completed"] == {"base": [0], "modx": [1, 2, 3, 4, 5]}

    # multi-caption retrieval as stored == brute force on the checkpoint's own embeddings
    from geomlab import kernels
    from geomlab.embed import embed_probe
    from geomlab.io import load_checkpoint
    from geomlab.models import create_model, state_dict_of
    from geomlab.traces import read_trace
    model, _, tok = create_model("geomlab-tiny")
    ckpt = out / "modx" / "checkpoints" / "phase5_step000002.pt"
    model.load_state_dict(state_dict_of(load_checkpoint(ckpt)))
    stream = build_stream("datasets", load_config(cfg)["data"], image_size=32, preprocess=None, seed=0)
    stored = [json.loads(l) for l in (out / "modx" / "metrics.jsonl").read_text().splitlines()]
    stored = [e for e in stored if e["kind"] == "eval" and e["phase"] == 5][-1]["retrieval"]
    trace = read_trace(out / "modx" / "traces" / "phase5_step000002.safetensors")
    for probe in stream.probes:
        emb = embed_probe(model, tok, probe, "cpu")
        want, i2t, t2i = brute_force_metrics(emb.image, emb.text, probe.caption_image)
        ranks = kernels.retrieval_ranks(emb.image, emb.text, probe.caption_image)
        assert ranks[0].tolist() == i2t.tolist() and ranks[1].tolist() == t2i.tolist()
        for k, v in want.items():
            assert stored[probe.name][k] == pytest.approx(v, abs=1e-6), (probe.name, k)
        t = trace.domains[probe.name]
        assert t.text.shape[0] == len(probe.captions) == (5 * 6 if probe.name == "flickr30k_test" else 3 * 4)
        assert torch.equal(t.caption_image, probe.caption_image) and torch.equal(t.ids, probe.ids)
        assert torch.allclose(t.image.float(), emb.image, atol=2e-3)

    a = subprocess.run([sys.executable, "-m", "geomlab.analyze", str(out)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=env)
    assert a.returncode == 0, a.stderr[-3000:]
    assert (out / "analysis" / "analysis.json").is_file() and (out / "analysis" / "report.html").is_file()


def test_corrupted_image_error_stops_naming_it_skip_reports_one(tmp_path, capsys):
    make_karpathy(tmp_path, n_train=2, n_test=4)
    make_csv(tmp_path, n=6, bad="truncated")
    sources = [{"name": "csv", "format": "csv", "path": "csv/train.csv"}, FLICKR_TEST]
    cfg = tmp_path / "exp.toml"
    # batch 12 = every pair of the phase: the truncated image is loaded in the first step (in a worker)
    cfg.write_text(config_text(tmp_path, sources, num_workers=1).replace("batch_size = 8", "batch_size = 12"))
    out = tmp_path / "err"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("geomlab.train: error:") and "203.jpg" in err and "unreadable image" in err, err
    assert "line 8" in err   # the record: the first CSV line naming that image

    out = tmp_path / "skip"
    assert train.main(["--config", str(cfg), "--out", str(out), "data.on_bad_sample=skip"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 bad record" in cap.out and "203.jpg" in cap.err
    info = json.loads((out / "run.json").read_text())
    (rec,) = info["skipped_records"]
    assert rec["file"].endswith("203.jpg") and "unreadable image" in rec["reason"]
    assert info["stream"]["phases"][0]["images"] == 5 and info["completed"] == {"base": [0]}


def test_paper_configs_build_on_the_documented_layout(tmp_path):
    """experiments/*.toml against a miniature of the layout experiments/README.md documents."""
    make_coco(tmp_path, n=6)
    (tmp_path / "coco/annotations/captions_train2017.json").rename(tmp_path / "coco/annotations/captions_train2014.json")
    (tmp_path / "coco/train2017").rename(tmp_path / "coco/train2014")
    images = []
    for k in range(4):
        name = f"COCO_val2014_{k:012d}.jpg"
        write_image(tmp_path / "coco" / "val2014" / name, 400 + k)
        images.append({"filepath": "val2014", "filename": name, "imgid": k, "split": "test", "cocoid": k,
                       "sentences": [{"raw": c} for c in captions(400 + k)]})
    (tmp_path / "coco/dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    make_karpathy(tmp_path, n_train=10, n_test=3)
    (tmp_path / "flickr30k/images").rename(tmp_path / "flickr30k/flickr30k-images")
    for name, phases in [("flickr30k_5phase", ["coco", *[f"flickr30k_{p}of5" for p in range(1, 6)]]),
                         ("coco_to_flickr30k", ["coco", "flickr30k"])]:
        cfg = load_config(ROOT / "experiments" / f"{name}.toml", [f"data.root={str(tmp_path)!r}"])
        t = cfg["train"]
        assert (t["epochs"], t["lr"], t["weight_decay"], t["eps"], t["warmup_fraction"], t["batch_size"],
                cfg["modx"]["alpha"]) == (35, 5e-4, 0.1, 1e-8, 0.2, 280, 20.0)
        s = build_stream("datasets", cfg["data"], image_size=32, preprocess=None, seed=0)
        assert [p.name for p in s.phases] == phases
        # the paper's probes, whole: no calibration set takes the end of them
        assert [(p.name, len(p.ids), len(p.captions)) for p in s.probes] == [("flickr30k_test", 3, 15), ("coco_test", 4, 20)]
        # train_captions = "random" (as released): one item per image, a caption drawn per access
        coco = s.phases[0].train
        assert len(coco) == 6 and coco[2][1] in captions(2) and coco[2][2] // 1000 == coco.records[2].uid
    assert [p.train.n_images for p in s.phases] == [6, 10]


# ----------------------------------------------------------------------------- every kind of image file

# (kind, file extension, PIL mode of the file as written)
KINDS = [("jpeg", "jpg", "RGB"), ("progressive", "jpg", "RGB"), ("cmyk", "jpg", "CMYK"),
         ("grey", "png", "L"), ("palette", "png", "P"), ("rgba", "png", "RGBA")]


def kind_bytes(i: int, kind: str) -> bytes:
    """A real image file of one kind the readers accept (a JPEG, progressive and CMYK JPEGs, greyscale,
    palette and RGBA PNGs), showing picture i."""
    from PIL import Image
    rgb = Image.open(io.BytesIO(image_bytes(i, "PNG")))
    buf = io.BytesIO()
    if kind in ("jpeg", "progressive"):
        rgb.save(buf, "JPEG", progressive=kind == "progressive")
    elif kind == "cmyk":
        rgb.convert("CMYK").save(buf, "JPEG")
    elif kind == "grey":
        rgb.convert("L").save(buf, "PNG")
    elif kind == "palette":
        rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(buf, "PNG")
    else:
        rgba = rgb.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(rgb.size))
        rgba.save(buf, "PNG")
    return buf.getvalue()


def make_kinds_csv(root: Path, name: str, start: int, n: int = 6) -> Path:
    """A CSV source of n images cycling through every kind, two captions each."""
    rows = ["filepath,title"]
    for k in range(n):
        kind, ext, _ = KINDS[k % len(KINDS)]
        rel = f"{name}/{start + k}_{kind}.{ext}"
        (root / "kinds" / name).mkdir(parents=True, exist_ok=True)
        (root / "kinds" / rel).write_bytes(kind_bytes(start + k, kind))
        rows += [f"{rel},{c}" for c in captions(start + k, 2)]
    path = root / "kinds" / f"{name}.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def make_kinds_wds(path: Path, start: int, n: int, empty_caption: int = -1) -> None:
    import webdataset as wds
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path)) as sink:
        for k in range(n):
            kind, ext, _ = KINDS[k % len(KINDS)]
            sink.write({"__key__": f"{k:07d}", ext: kind_bytes(start + k, kind),
                        "txt": "" if k == empty_caption else "\n".join(captions(start + k, 2))})


def kinds_sources(root: Path, **probe) -> list[dict]:
    make_kinds_csv(root, "train", 700)
    make_kinds_csv(root, "probe", 800)
    return [{"name": "train", "format": "csv", "path": "kinds/train.csv"},
            {"name": "probe", "format": "csv", "path": "kinds/probe.csv", "role": "probe", **probe}]


def test_every_image_kind_is_decoded_once_and_held_exactly(tmp_path):
    """Probe images of every kind are decoded once, up front, and held as uint8 after the resize and
    crop: each item equals open_clip's evaluation transform of the file, and the embeddings equal
    those of images decoded at each checkpoint (DataLoader workers); probe ids are image uids."""
    from PIL import Image

    from geomlab.data.readers import open_image
    from geomlab.embed import embed_probe
    from geomlab.models import create_model
    sources = kinds_sources(tmp_path)
    for k, (kind, ext, mode) in enumerate(KINDS):
        with Image.open(tmp_path / "kinds" / "probe" / f"{800 + k}_{kind}.{ext}") as im:
            assert im.mode == mode and (kind != "progressive" or im.info.get("progressive")), kind
    model, transforms, tok = create_model("geomlab-tiny")
    held = build_stream("datasets", data_config(tmp_path, sources), image_size=32, preprocess=transforms, seed=0)
    (probe,) = held.probes
    assert probe.images.in_memory and probe.images.pixels.dtype == torch.uint8
    assert tuple(probe.images.pixels.shape) == (6, 3, 32, 32)
    decoded = torch.stack([transforms["val"](open_image(rec)) for rec in probe.images.records])
    assert torch.equal(torch.stack([probe.images[i] for i in range(6)]), decoded)
    assert torch.equal(torch.cat(list(probe.images.batches(4, "cpu"))), decoded)   # what each checkpoint embeds
    # uids: source index (the probe is source 1) × 10⁹ + ordinal; the trace's ids
    assert probe.ids.tolist() == [1 * 10 ** 9 + k for k in range(6)]
    cold = build_stream("datasets", data_config(tmp_path, sources, probe_cache_mb=0), image_size=32,
                        preprocess=transforms, seed=0)
    assert not cold.probes[0].images.in_memory
    a = embed_probe(model, tok, probe, "cpu", batch_size=4)
    b = embed_probe(model, tok, cold.probes[0], "cpu", batch_size=4, num_workers=1)
    assert torch.equal(a.image, b.image) and torch.equal(a.text, b.text)


def test_held_probe_images_respect_the_memory_budget(tmp_path):
    import open_clip

    from geomlab.data.readers import Bad, load_probe_images, read_csv
    sources = kinds_sources(tmp_path)
    records = read_csv(tmp_path / "kinds" / "probe.csv", None, img_key="filepath", caption_key="title",
                       separator="", source="p", bad=Bad())
    tf = open_clip.image_transform(32, is_train=False)
    one = 3 * 32 * 32
    assert load_probe_images(records, tf, source="p", bad=Bad(), budget_bytes=6 * one).in_memory
    assert not load_probe_images(records, tf, source="p", bad=Bad(), budget_bytes=6 * one - 1).in_memory
    # several probe sets share the budget: the second does not fit in what the first left
    cfg = data_config(tmp_path, [*sources, dict(sources[1], name="probe2", path="kinds/probe.csv")])
    cfg["probe_cache_mb"] = 1   # 1,048,576 B; at 200 px a set of 6 images takes 6 × 120,000 B
    s = build_stream("datasets", cfg, image_size=200, preprocess=None, seed=0)
    assert [p.images.in_memory for p in s.probes] == [True, False]


# ----------------------------------------------------------------------------- shards cut short

def cut_shards(root: Path) -> dict:
    """8-sample shards of every image kind, cut: inside a member header, inside a member's data,
    and at a member boundary (no end-of-archive block). -> {name: (path, samples kept)}"""
    import tarfile
    whole = root / "wds" / "whole.tar"
    make_kinds_wds(whole, 900, 8)
    data = whole.read_bytes()
    with tarfile.open(whole) as t:
        members = {m.name: m for m in t.getmembers()}
    img5 = next(m for n, m in members.items() if n.startswith("0000005."))
    txt4 = members["0000004.txt"]
    cuts = {"header": (img5.offset + 200, 5),                 # inside sample 5's first header
            "data": (img5.offset_data + 100, 5),             # inside sample 5's image
            "boundary": (txt4.offset_data + 512, 5),         # right after sample 4: no end block
            "caption": (txt4.offset_data + 10, 4)}           # inside sample 4's caption: 4 is lost too
    out = {}
    for name, (at, kept) in cuts.items():
        (root / "wds" / f"{name}.tar").write_bytes(data[:at])
        out[name] = (root / "wds" / f"{name}.tar", kept)
    return out


def test_a_truncated_shard_is_an_error_or_one_skipped_record(tmp_path, capsys):
    make_karpathy(tmp_path, n_train=0, n_test=4)
    for name, (path, kept) in cut_shards(tmp_path).items():
        src = {"name": "wds", "format": "wds", "path": str(path)}
        with pytest.raises(DataError) as e:
            build_stream("datasets", data_config(tmp_path, [src, FLICKR_TEST]), image_size=32, preprocess=None, seed=0)
        msg = str(e.value)
        last = "0000004.png" if name == "caption" else "0000004.txt"   # sample 4: a palette PNG
        assert len(msg.splitlines()) == 1 and str(path) in msg and "truncated shard" in msg, msg
        assert f"last complete member {last}" in msg and "on_bad_sample" in msg, msg
        s = build_stream("datasets", data_config(tmp_path, [src, FLICKR_TEST], on_bad_sample="skip"), image_size=32,
                         preprocess=None, seed=0)
        (phase,) = s.phases
        assert [r.ref for r in phase.train.records] == [f"key {k:07d}" for k in range(kept)], name
        (rec,) = s.skipped
        assert rec["file"] == str(path) and rec["reason"].startswith("truncated shard"), rec
        assert rec["record"] == (f"from key {kept:07d} on" if name == "caption" else f"after key {kept - 1:07d}")
        assert phase.train[len(phase.train) - 1][0].shape == (3, 32, 32)   # the last kept sample decodes
    capsys.readouterr()
    # cut before any member is whole: every sample is the rest; a file that is no tar stays an error
    from geomlab.data.readers import Bad, read_wds
    (tmp_path / "wds" / "first.tar").write_bytes((tmp_path / "wds" / "whole.tar").read_bytes()[:300])
    (tmp_path / "wds" / "junk.tar").write_bytes(b"x" * 1024)
    bad = Bad("skip", quiet=True)
    assert read_wds("wds/first.tar", tmp_path, image_ext=["jpg", "png"], caption_ext="txt", source="w", bad=bad) == []
    assert [(r["record"], r["reason"].split(";")[0]) for r in bad.skipped] == [
        ("every sample", "truncated shard: cut inside its first member header (the file has 300 bytes)")]
    with pytest.raises(DataError, match="junk.tar: not a readable tar shard"):
        read_wds("wds/junk.tar", tmp_path, image_ext=["jpg"], caption_ext="txt", source="w", bad=bad)
    # a limit within the samples before the cut never meets the cut
    src = {"name": "wds", "format": "wds", "path": "wds/header.tar", "limit": 3}
    s = build_stream("datasets", data_config(tmp_path, [src, FLICKR_TEST]), image_size=32, preprocess=None, seed=0)
    assert s.phases[0].train.n_images == 3 and not s.skipped


def test_a_truncated_shard_stops_the_cli_before_training(tmp_path, capsys):
    make_karpathy(tmp_path, n_train=0, n_test=4)
    path, _ = cut_shards(tmp_path)["header"]
    cfg = tmp_path / "exp.toml"
    cfg.write_text(config_text(tmp_path, [{"name": "wds", "format": "wds", "path": str(path)}, FLICKR_TEST]))
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("geomlab.train: error:") and str(path) in err, err
    assert "last complete member 0000004.txt" in err and not out.exists()


# ----------------------------------------------------------------------------- image errors, counted once

def png_decompression_bomb(side: int = 14000) -> bytes:
    """A valid 1-bit PNG of side² pixels, over PIL's decompression-bomb limit (2 × 89,478,485),
    written directly (zlib) because PIL takes seconds to encode it."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\0" * (1 + (side + 7) // 8)   # filter byte 0, then black pixels
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(row * side, 9)) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_an_image_error_under_both_policies(tmp_path, capsys):
    from PIL import Image
    sources = kinds_sources(tmp_path)
    (tmp_path / "kinds" / "train" / "bomb.png").write_bytes(png_decompression_bomb())
    limit = 2 * Image.MAX_IMAGE_PIXELS
    with pytest.MonkeyPatch.context() as mp:   # a real PNG: PIL reads it when told to ignore the limit
        mp.setattr(Image, "MAX_IMAGE_PIXELS", None)
        with Image.open(tmp_path / "kinds" / "train" / "bomb.png") as im:
            assert im.size == (14000, 14000) and im.size[0] * im.size[1] > limit
    csv_path = tmp_path / "kinds" / "train.csv"
    csv_path.write_text(csv_path.read_text() + "train/bomb.png,an empty picture too big to open\n")
    cfg = tmp_path / "exp.toml"
    # batch 14 > the 13 pairs: the bomb is decoded in the first step
    cfg.write_text(config_text(tmp_path, sources).replace("batch_size = 8", "batch_size = 14"))
    assert train.main(["--config", str(cfg), "--out", str(tmp_path / "err")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("geomlab.train: error:") and "bomb.png" in err and "DecompressionBombError" in err, err
    assert "on_bad_sample" in err and "line 14" in err
    s = build_stream("datasets", data_config(tmp_path, sources, on_bad_sample="skip"), image_size=32,
                     preprocess=None, seed=0)
    (rec,) = s.skipped
    assert rec["file"].endswith("bomb.png") and "DecompressionBombError" in rec["reason"]
    assert s.phases[0].train.n_images == 6


def test_every_bad_input_is_counted_once(tmp_path, capsys):
    make_karpathy(tmp_path, n_train=0, n_test=4)
    make_kinds_wds(tmp_path / "wds" / "empty.tar", 950, 6, empty_caption=2)
    make_coco(tmp_path, n=3)
    ann_path = tmp_path / "coco/annotations/captions_train2017.json"
    ann = json.loads(ann_path.read_text())
    for a in ann["annotations"]:
        if a["image_id"] == 1001:
            a["caption"] = " "     # every caption of one image is empty
    ann_path.write_text(json.dumps(ann))
    sources = [{"name": "wds", "format": "wds", "path": "wds/empty.tar"},
               {"name": "coco", "format": "coco", "path": str(ann_path), "images": "coco/train2017"}, FLICKR_TEST]
    s = build_stream("datasets", data_config(tmp_path, sources, on_bad_sample="skip"), image_size=32,
                     preprocess=None, seed=0)
    wds_skips = [r for r in s.skipped if r["source"] == "wds"]
    assert wds_skips == [{"source": "wds", "file": str(tmp_path / "wds/empty.tar"), "record": "key 0000002",
                          "reason": "empty caption member .txt"}]
    coco_skips = [r for r in s.skipped if r["source"] == "coco"]
    assert len(coco_skips) == 5 and all("image id 1001" in r["record"] for r in coco_skips)  # its 5 captions
    assert s.info["skipped"] == 6 and [p.train.n_images for p in s.phases] == [5, 2]
    capsys.readouterr()


# ----------------------------------------------------------------------------- probes checked before training

def test_a_bad_probe_image_stops_the_run_before_training(tmp_path, capsys):
    sources = kinds_sources(tmp_path)
    bad_png = tmp_path / "kinds" / "probe" / "804_palette.png"
    data = bad_png.read_bytes()
    bad_png.write_bytes(data[: len(data) // 2])
    cfg = tmp_path / "exp.toml"
    cfg.write_text(config_text(tmp_path, sources).replace("base_steps = 2", "base_steps = 400"))
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "804_palette.png" in err and "unreadable image" in err, err
    assert "on_bad_sample" in err and not out.exists()   # nothing trained, nothing written


def test_limit_and_probe_size_bound_the_checks(tmp_path):
    """A partial download: images past `limit` (a probe source) and past `probe_size` are missing or
    broken; a run that uses only the first ones is not stopped by them."""
    sources = kinds_sources(tmp_path)
    (tmp_path / "kinds" / "probe" / "805_rgba.png").unlink()                        # past limit = 5
    (tmp_path / "kinds" / "probe" / "804_palette.png").write_bytes(b"not a png")    # past probe_size = 3
    cfg = data_config(tmp_path, [sources[0], dict(sources[1], limit=5)])
    cfg["probe_size"] = 3
    s = build_stream("datasets", cfg, image_size=32, preprocess=None, seed=0)
    assert len(s.probes[0].ids) == 3 and not s.skipped
    with pytest.raises(DataError, match="805_rgba.png"):
        build_stream("datasets", data_config(tmp_path, sources), image_size=32, preprocess=None, seed=0)
    with pytest.raises(DataError, match="804_palette.png"):
        build_stream("datasets", data_config(tmp_path, [sources[0], dict(sources[1], limit=5)]), image_size=32,
                     preprocess=None, seed=0)


# ----------------------------------------------------------------------------- a failed start, begun again

def test_a_failed_start_is_begun_again_with_a_new_config(tmp_path, capsys):
    sources = kinds_sources(tmp_path)
    broken = tmp_path / "kinds" / "train" / "703_grey.png"
    broken.write_bytes(broken.read_bytes()[:60])
    cfg = tmp_path / "exp.toml"
    cfg.write_text(config_text(tmp_path, sources).replace("batch_size = 8", "batch_size = 12"))
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2   # decoded in the first step
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "703_grey.png" in err and "unreadable image" in err and "on_bad_sample=\"skip\"" in err, err
    assert (out / "config.toml").is_file() and (out / "run.json").is_file()
    assert not list(out.rglob("*.pt"))
    assert train.main(["--config", str(cfg), "--out", str(out), "data.on_bad_sample=skip"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 bad record" in cap.out and "703_grey.png" in cap.err
    info = json.loads((out / "run.json").read_text())
    assert info["completed"] == {"base": [0]} and len(info["skipped_records"]) == 1
    assert 'on_bad_sample = "skip"' in (out / "config.toml").read_text()
    # with checkpoints, it is a run: another config is refused, saying when a directory is begun again
    assert train.main(["--config", str(cfg), "--out", str(out), "train.steps=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different run" in err and "before its first checkpoint" in err, err


def test_an_unreadable_shard_member_is_named_not_its_buffer(tmp_path):
    import webdataset as wds

    from geomlab.data.readers import Bad, open_image, read_wds
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "a", "jpg": b"not a jpeg", "txt": "a caption"})
    (rec,) = read_wds("s.tar", tmp_path, image_ext=["jpg"], caption_ext="txt", source="w", bad=Bad())
    with pytest.raises(DataError) as e:
        open_image(rec, "w")
    msg = str(e.value)
    assert "BytesIO" not in msg and "cannot identify image file 'a.jpg'" in msg and "s.tar:a.jpg" in msg, msg
