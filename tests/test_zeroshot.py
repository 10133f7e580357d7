"""Zero-shot classification (docs/definitions.md, "Zero-shot classification"): ShapeWorld's shape and
colour sets and ImageFolder directories, against an independent computation; the trainer records it
at every checkpoint, the analyser and the report carry it."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

import geomlab.models  # noqa: F401  (registers geomlab-tiny)
from geomlab import train
from geomlab.analyze import analyze
from geomlab.data import ZeroShotSet, build_stream
from geomlab.data.shapes import DOMAINS, ZEROSHOT_TEMPLATES
from geomlab.embed import embed_probe
from geomlab.figures import figures
from geomlab.geometry.synthetic import synthetic_run
from geomlab.io import load_checkpoint, read_jsonl
from geomlab.models import create_model, state_dict_of
from geomlab.zeroshot import evaluate


def by_hand(model, tokenizer, image_features, classes, templates, labels) -> float:
    """Top-1 accuracy: class embedding = normalised mean of normalised prompt embeddings; argmax in
    float64 by a plain loop (first maximum wins)."""
    with torch.no_grad():
        cls = []
        for c in classes:
            e = torch.stack([F.normalize(model.encode_text(tokenizer([t.format(c)])).double()[0], dim=0)
                             for t in templates]).mean(0)
            cls.append(e / e.norm())
    right = 0
    for x, y in zip(F.normalize(image_features.double(), dim=1), labels.tolist()):
        scores = [float(x @ c) for c in cls]
        right += scores.index(max(scores)) == y
    return right / len(labels)


@pytest.fixture(scope="module")
def shapes_stream():
    return build_stream("shapes", {"probe_size": 40, "calibration_size": 8, "shapes": {"domains": 2, "train_size": 4}},
                        image_size=32, preprocess=None, seed=0)


def test_shapeworld_sets_label_each_probe_image_by_its_caption(shapes_stream):
    sets = {z.name: z for z in shapes_stream.zeroshot}
    assert list(sets) == ["d0_basic/shape", "d0_basic/colour", "d1_neon/shape", "d1_neon/colour"]
    for probe in (p for p in shapes_stream.probes if p.kind == "seen"):  # none on the novel probes
        d = next(d for d in DOMAINS if d.name == probe.name)
        for task, classes in (("shape", d.shape_names), ("colour", d.colour_names)):
            z = sets[f"{probe.name}/{task}"]
            assert z.probe == probe.name and z.images is None and z.classes == list(classes)
            assert z.templates == list(ZEROSHOT_TEMPLATES[task]) and len(z.labels) == len(probe.ids)
            for caption, label in zip(probe.captions, z.labels.tolist()):
                named = [k for k, c in enumerate(classes) if re.search(rf"\b{c}\b", caption)]
                assert named == [label], (caption, classes)


def test_accuracy_equals_an_independent_computation(shapes_stream):
    torch.manual_seed(3)
    model, _, tokenizer = create_model("geomlab-tiny")
    model.train()
    feats = {p.name: embed_probe(model, tokenizer, p, "cpu").image for p in shapes_stream.probes}
    # two templates on one set: the prompt ensemble
    two = ZeroShotSet("two templates", ["circle", "square", "triangle", "star"], ["a {}", "a photo of a {}."],
                      shapes_stream.zeroshot[0].labels, probe="d0_basic")
    sets = [*shapes_stream.zeroshot, two]
    rng = torch.get_rng_state()
    got = evaluate(model, tokenizer, sets, "cpu", feats)
    assert torch.equal(torch.get_rng_state(), rng) and model.training  # no random draw; mode restored
    model.eval()
    images = {p.name: torch.stack([p.images[i] for i in range(len(p.ids))]) for p in shapes_stream.probes}
    with torch.no_grad():
        own = {k: model.encode_image(v) for k, v in images.items()}
    for z in sets:
        want = by_hand(model, tokenizer, own[z.probe], z.classes, z.templates, z.labels)
        assert got[z.name] == pytest.approx(want, abs=1e-12), z.name
    assert len(set(got.values())) > 1


# ----------------------------------------------------------------------------- ImageFolder

CLASSES = {"red_disc": (220, 40, 40), "blue": (40, 80, 225), "green_square": (40, 170, 60)}


def make_imagefolder(root: Path, per_class: int = 3) -> None:
    from PIL import Image
    for k, (name, colour) in enumerate(CLASSES.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            a = np.zeros((20, 24, 3), np.uint8) + np.array(colour, np.uint8)
            a[i:i + 6, 2 * i:2 * i + 8] = 255 - k * 60
            fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[(i + k) % 2]
            Image.fromarray(a).save(root / name / f"img{i}.{ext}", format=fmt)
    (root / "blue" / "notes.txt").write_text("not an image")


def write_csv(root: Path, name: str, first: int, n: int) -> None:
    from PIL import Image
    rows = ["filepath,title"]
    for i in range(first, first + n):
        (root / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,picture number {i}")
    (root / f"{name}.csv").write_text("\n".join(rows) + "\n")


def experiment(root: Path, zeroshot: dict) -> Path:
    write_csv(root, "train", 0, 8)
    write_csv(root, "probe", 100, 4)
    sources = [{"name": "pics", "format": "csv", "path": "train.csv", "k": 2},
               {"name": "pics_test", "format": "csv", "path": "probe.csv", "role": "probe", "measures": ["pics"]},
               {"name": "folder", "role": "zeroshot", "format": "imagefolder", "path": "folder", **zeroshot}]
    lines = ['[run]', 'strategies = ["finetune"]', '[data]', 'stream = "datasets"', f'root = "{root}"',
             'calibration_size = 0',  # tiny probe sources: no room for a calibration set
             '[train]', 'batch_size = 4', 'base_steps = 2', 'steps = 2', 'checkpoint_every = 1', 'log_every = 1']
    for s in sources:
        lines += ["[[data.sources]]", *[f"{k} = {json.dumps(v)}" for k, v in s.items()]]
    cfg = root / "exp.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


def test_imagefolder_zero_shot_end_to_end(tmp_path):
    """A tiny ImageFolder of real PNG and JPEG files as the datasets stream's zero-shot probe: the
    trainer's accuracy at every checkpoint equals one computed from the checkpoint, the files and
    open_clip's own transform; the analyser and the report carry it."""
    make_imagefolder(tmp_path / "folder")
    templates = ["a photo of a {}.", "a {} thing"]
    cfg = experiment(tmp_path, {"templates": templates})
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["probe_phases"] == {"pics_test": [0, 1]}
    assert info["stream"]["zeroshot_sets"] == [{"name": "folder", "images": 9, "classes": 3}]

    from PIL import Image
    files = sorted((tmp_path / "folder").glob("*/img*"))
    folders = sorted(CLASSES)
    labels = torch.tensor([folders.index(f.parent.name) for f in files])
    tf = open_clip.image_transform(32, is_train=False)
    images = torch.stack([tf(Image.open(f).convert("RGB")) for f in files])
    classes = [f.replace("_", " ") for f in folders]   # "red disc", "blue", "green square"
    model, _, tokenizer = create_model("geomlab-tiny")
    model.eval()
    rows = [r for d in ("base", "finetune") for r in read_jsonl(out / d / "metrics.jsonl") if r["kind"] == "eval"]
    assert len(rows) == 2 + 2
    for r in rows:
        d = "base" if r["phase"] == 0 else "finetune"
        model.load_state_dict(state_dict_of(load_checkpoint(out / d / "checkpoints" / f"{r['checkpoint']}.pt")))
        with torch.no_grad():
            want = by_hand(model, tokenizer, model.encode_image(images), classes, templates, labels)
        assert r["zeroshot"] == {"folder": pytest.approx(want, abs=1e-12)}

    a = analyze(out, report=False, quiet=True)
    s = a["strategies"]["finetune"]
    assert s["zeroshot"] == [next(r["zeroshot"] for r in rows if (r["phase"], r["step"]) == (c["phase"], c["step"]))
                             for c in s["checkpoints"]]
    assert "zeroshot" in [f[0] for f in figures(a)]


@pytest.mark.parametrize("case, needle", [
    ("one class", "at least two class sub-folders"),
    ("no brace", "templates"),
    ("probe role", "imagefolder"),
    ("missing", "does not exist"),
])
def test_bad_zero_shot_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case, needle):
    make_imagefolder(tmp_path / "folder")
    zs = {}
    if case == "one class":
        for name in ("blue", "green_square"):
            for f in (tmp_path / "folder" / name).iterdir():
                f.unlink()
            (tmp_path / "folder" / name).rmdir()
    elif case == "no brace":
        zs = {"templates": ["a photo"]}
    elif case == "probe role":
        zs = {"role": "probe"}
    else:
        zs = {"path": "nowhere"}
    out = tmp_path / "run"
    assert train.main(["--config", str(experiment(tmp_path, zs)), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("geomlab.train: error:") and needle in err, err
    assert not out.exists()


def test_synthetic_run_zero_shot_reaches_the_analysis_and_report(tmp_path):
    root = synthetic_run(tmp_path / "syn", strategies=("finetune",), checkpoints=3, domains=2, n=20, d=8)
    a = analyze(root, report=False, quiet=True)
    s = a["strategies"]["finetune"]
    evals = {(r["phase"], r["step"]): r["zeroshot"] for d in ("base", "finetune")
             for r in read_jsonl(root / d / "metrics.jsonl")}
    assert s["zeroshot"] == [evals[c["phase"], c["step"]] for c in s["checkpoints"]]
    assert set(s["zeroshot"][0]) == {"domain0/i2t", "domain1/i2t"}
