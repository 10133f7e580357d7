"""A new user's first hour through the CLI: resume from the run's own config, a clean Ctrl-C,
adding a strategy to a run, flag hints, --dry-run."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import torch

from geomlab import train
from geomlab.io import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[run]
name = "mine"
strategies = ["finetune"]
[model]
name = "geomlab-tiny"
[data]
stream = "shapes"
probe_size = 16
calibration_size = 8
[data.shapes]
domains = 2
train_size = 96
[train]
batch_size = 16
base_steps = 4
checkpoint_every = 4
log_every = 1
"""
# overrides the run was started with: a resume without --config must not need them again
OVERRIDES = ["train.steps=24", "data.probe_size=12"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "geomlab.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def weights(run: Path, strategy: str, phase: int, step: int) -> dict:
    return load_checkpoint(run / strategy / "checkpoints" / f"phase{phase}_step{step:06d}.pt")["state_dict"]


def mtimes(path: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in path.rglob("*")}


def test_ctrl_c_stops_cleanly_and_a_resume_from_the_runs_own_config_matches(tmp_path, capsys):
    config = tmp_path / "mine.toml"
    config.write_text(CONFIG)
    whole = tmp_path / "whole"
    assert cli("--config", str(config), "--out", str(whole), *OVERRIDES).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "geomlab.train", "--config", str(config), "--out", str(cut),
                             *OVERRIDES], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = cut / "finetune" / "state.pt"
    deadline = time.time() + 240
    while not state.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert last.startswith("interrupted at finetune phase 1 step ") and "Traceback" not in err, err[-2000:]
    assert f"continue with: python -m geomlab.train --out {cut} --resume" in last
    saved = load_checkpoint(state)
    assert saved["phase"] == 1 and 0 < saved["step"] < 24 and f"step {saved['step']};" in last

    # the same command minus the overrides, even minus --config: the run's own config.toml
    resumed = cli("--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming finetune phase 1 at step {saved['step']} of 24" in resumed.stderr
    a, b = weights(whole, "finetune", 1, 24), weights(cut, "finetune", 1, 24)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6

    # an override that a resume may not change: the key is named, and the advice is not another --out
    assert train.main(["--out", str(cut), "--resume", "train.steps=50"]) == 2
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1 and "'train.steps'" in line and "choose another --out" not in line, line

    # adding a strategy trains only it, from the shared base; the base's files are untouched
    before = mtimes(cut / "base")
    added = cli("--out", str(cut), "--resume", "--strategies", "finetune,wise", "wise.alpha=0.8")  # with its options
    assert added.returncode == 0, added.stderr[-2000:]
    assert mtimes(cut / "base") == before
    assert (cut / "wise" / "checkpoints" / "phase1_step000024.pt").is_file()
    assert tomllib.loads((cut / "config.toml").read_text())["wise"]["alpha"] == 0.8
    assert train.main(["--out", str(cut), "--resume", "wise.alpha=0.3"]) == 2  # once trained, they are fixed
    assert "'wise.alpha'" in capsys.readouterr().err
    assert train.main(["--out", str(cut), "--resume", "--strategies", "wise"]) == 2
    err = capsys.readouterr().err
    assert "not remove" in err and "finetune" in err, err


def test_flags_that_are_config_keys_and_bare_lists_get_a_hint(capsys):
    assert train.main(["--lr", "1e-4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.lr=1e-4" in err, err
    assert train.main(["run.strategies=[finetune]"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown strategy '[finetune]'" in err and "run.strategies=finetune,modx" in err, err


def test_help_and_config_errors_answer_before_torch_loads():
    """python -m geomlab.train runs its command-line check before importing torch and open_clip:
    run here as a module in a fresh interpreter, which then reports what was imported."""
    probe = ("import runpy, sys\n"
             "sys.argv = ['geomlab.train', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('geomlab.train', run_name='__main__')\n"
             "except SystemExit as e:\n"
             "    print(e.code, 'torch' in sys.modules, 'open_clip' in sys.modules)\n")
    for args, code, err in ((["--help"], "0", ""),
                            (["train.lrr=1"], "2", "unknown config key 'train.lrr' (did you mean train.lr?)"),
                            (["--config", "missing.toml"], "2", "missing.toml"),
                            (["--seeds", "0,x"], "2", "--seeds must be comma-separated integers")):
        r = subprocess.run([sys.executable, "-c", probe, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.stdout.splitlines()[-1] == f"{code} False False", (args, r.stdout[-500:], r.stderr[-500:])
        assert err in r.stderr and (not err or r.stderr.startswith("geomlab.train: error:")), (args, r.stderr)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "never"
    assert train.main(["--out", str(out), "--dry-run", "--strategies", "finetune,modx", "data.shapes.domains=2",
                       "data.shapes.train_size=40", "data.probe_size=8", "train.batch_size=64"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    assert "0 d0_basic" in text and "1 d1_neon" in text and "40 pairs" in text
    assert "d0_basic/novel" in text and "phase 0" in text and "modx (alpha=20.0" in text
    # the calibration sets (default data.calibration_size), listed with their kind
    assert re.search(r"d1_neon/calibration +512 +512  phase 1 \(calibration\)", text), text
    assert "warning: phase 'd0_basic' has 40 pairs, fewer than a batch (64)" in text and "refused unless" in text
    # without the option a batch larger than a phase is refused, before anything is written
    assert train.main(["--out", str(out), "--strategies", "finetune", "data.shapes.domains=2",
                       "data.shapes.train_size=40", "data.probe_size=8", "train.batch_size=64"]) == 2
    err = capsys.readouterr().err
    assert "train.allow_repeats" in err and "'d0_basic' (40 pairs)" in err
    assert not out.exists()


def test_a_bad_image_skipped_on_resume_keeps_the_finished_phases_bit_for_bit(tmp_path, capsys):
    import hashlib
    import json

    from test_data_real import FLICKR_TEST, config_text, make_csv, make_karpathy
    make_karpathy(tmp_path, n_train=2, n_test=4)
    make_csv(tmp_path, n=8, bad="truncated")  # image 203 ("indoor") is cut in half
    sources = [{"name": "csv", "format": "csv", "path": "csv/train.csv", "key": "domain",
                "key_values": ["outdoor", "indoor"]}, FLICKR_TEST]  # the bad image trains in phase 1
    cfg = tmp_path / "exp.toml"
    cfg.write_text(config_text(tmp_path, sources).replace("batch_size = 8", "batch_size = 4"))
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2
    assert "203.jpg" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["completed"] == {"base": [0]}

    def digests(d: Path) -> dict:
        return {p.relative_to(d): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}
    base = digests(out / "base")
    assert train.main(["--out", str(out), "--resume", "data.on_bad_sample=skip"]) == 0
    assert digests(out / "base") == base
    info = json.loads((out / "run.json").read_text())
    assert info["completed"] == {"base": [0], "finetune": [1]} and len(info["skipped_records"]) == 1
    (resume,) = info["resumes"]
    assert resume["changed"] == {"data.on_bad_sample": ["error", "skip"]} and resume["at"] == {"finetune": [1, 0]}


def _readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- {marker} -->", 1)[1]
    return after.split("```", 2)[1].split("\n", 1)[1]


def test_the_readmes_own_data_walkthrough_runs_as_written(tmp_path):
    """Every command of the README's "Your own data, step by step", on generated photos."""
    from test_data_real import write_image
    for name, offset in (("photos.csv", 0), ("heldout.csv", 500)):
        rows = ["filepath,title,domain"]
        for k in range(30 if name == "photos.csv" else 9):  # 10 pairs a phase: more than a batch
            i = offset + k
            domain = ("outdoor", "indoor", "studio")[k % 3]
            write_image(tmp_path / "mydata" / "img" / f"{i}.jpg", i)
            rows.append(f"img/{i}.jpg,photo number {i} taken {domain},{domain}")
        (tmp_path / "mydata" / name).write_text("\n".join(rows) + "\n")
    (tmp_path / "mine.toml").write_text(_readme_block("walkthrough-config"))
    commands = [c for c in _readme_block("walkthrough-commands").splitlines() if c.strip()]
    assert len(commands) == 4
    outputs = []
    for command in commands:
        argv = command.split()
        assert argv[:2] == ["python", "-m"]
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (command, r.stderr[-2000:])
        outputs.append(r)
        if "--dry-run" in argv:
            assert not (tmp_path / "runs").exists()
            assert "photos_outdoor" in r.stdout and "heldout_studio" in r.stdout and "modx (alpha=" in r.stdout
    run = tmp_path / "runs" / "mine"
    assert (run / "modx" / "checkpoints").is_dir() and (run / "analysis" / "analysis.json").is_file()
    assert outputs[-1].stdout.strip().endswith("runs/mine/analysis/report.html")


def test_the_end_of_training_table_keeps_whole_names_aligned(tmp_path):
    """The summary the trainer prints: full probe-set names, columns under their headers, one probe
    set included (a golden output)."""
    import json

    from geomlab.rundir import RunDir

    def eval_row(phase, r1):
        return {"kind": "eval", "phase": phase, "step": 10, "phase_end": True,
                "retrieval": {p: {"image_to_text_R@1": v, "text_to_image_R@1": v} for p, v in r1.items()}}
    for name, probes in (("one", ["heldout_indoor_photos"]), ("two", ["heldout_indoor_photos", "d0"])):
        run = RunDir(tmp_path / name)
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"probes": probes}))  # columns in stream order
        run.append_metrics("base", eval_row(0, {p: 0.5 for p in probes}))
        run.append_metrics("finetune", eval_row(1, {p: 0.25 for p in probes}))
        text = run.summary({"run": {"strategies": ["finetune"]}})
        body = text.split("\n", 2)[2]
        if name == "one":
            assert body == ("                 heldout_indoor_photos\n"
                            "  base p0                        0.500\n"
                            "  finetune p1                    0.250")
        else:
            assert body == ("                 heldout_indoor_photos       d0\n"
                            "  base p0                        0.500    0.500\n"
                            "  finetune p1                    0.250    0.250")


def test_a_pretrained_base_is_row_0_and_every_stream_phase_is_trained(tmp_path):
    """train.base = "pretrained": no base phase; base/phase0_step000000 holds the --pretrained
    weights, the accuracy matrix's row 0 is their R@1 (recomputed here by brute force from the
    model the file loads into), and the stream's domains are phases 1 and 2 — for the strategies
    that keep something of phase 0 (a replay buffer, DER's anchors, EWC's Fisher) as well."""
    import json

    from geomlab.config import load_config
    from geomlab.data import build_stream
    from geomlab.embed import embed_probe
    from geomlab.models import create_model, image_size

    small = ["data.shapes.domains=2", "data.shapes.train_size=64", "data.probe_size=16", "train.batch_size=16",
             "train.steps=3", "der.anchor_size=8", "data.calibration_size=8"]
    torch.manual_seed(7)  # weights no run of this test starts from by itself
    weights_file = tmp_path / "released.pt"
    torch.save({"state_dict": create_model("geomlab-tiny")[0].state_dict()}, weights_file)
    assert train.main(["--out", str(tmp_path / "b"), "--strategies", "finetune,er,der,ewc", "--pretrained",
                       str(weights_file), "train.base=pretrained", *small]) == 0
    run = tmp_path / "b"
    base = load_checkpoint(run / "base" / "checkpoints" / "phase0_step000000.pt")["state_dict"]
    pretrained = load_checkpoint(weights_file)["state_dict"]
    assert all(torch.equal(base[k], pretrained[k]) for k in pretrained)
    info = json.loads((run / "run.json").read_text())
    assert info["phases"] == ["pretrained", "d0_basic", "d1_neon"] and info["phase_pairs"] == [0, 64, 64]
    assert info["probe_phases"]["d0_basic"] == [1] and info["probe_phases"]["d1_neon"] == [2]
    for strategy in ("finetune", "er", "der", "ewc"):
        assert sorted(p.name for p in (run / strategy / "checkpoints").iterdir()) == [
            "phase1_step000003.pt", "phase2_step000003.pt"]

    from geomlab.analyze import main as analyze

    assert analyze([str(run), "-q"]) == 0
    accuracy = json.loads((run / "analysis" / "analysis.json").read_text())["strategies"]["finetune"]["accuracy"]
    row0 = dict(zip(accuracy["domains"], accuracy["matrix"][0]))
    config = load_config(None, small)
    model, transforms, tokenizer = create_model("geomlab-tiny", str(weights_file))
    stream = build_stream("shapes", config["data"], image_size=image_size(model), preprocess=transforms, seed=0)
    for probe in (p for p in stream.probes if p.kind != "calibration"):  # calibration sets: no column
        e = embed_probe(model, tokenizer, probe, "cpu")
        similarity = e.image.double() @ e.text.double().T
        i2t = (probe.caption_image[similarity.argmax(1)] == torch.arange(len(e.image))).double().mean()
        t2i = (similarity.argmax(0) == probe.caption_image).double().mean()
        assert abs(row0[probe.name] - float(i2t + t2i) / 2) < 1e-9, probe.name


def test_a_run_from_before_a_new_config_key_resumes_and_other_changes_are_still_refused(tmp_path):
    """A run whose stored config.toml predates a key (train.base, added with its default) is the same
    run on --resume; a real difference is still named."""
    import pytest

    from geomlab.config import dumps, load_config
    from geomlab.rundir import RunDir, RunDirError

    config = load_config(None)
    run = RunDir(tmp_path / "old")
    run.create(dumps(config).replace('base = "train"\n', ""))
    assert 'base = "train"' not in run.config_path.read_text()
    (tmp_path / "old" / "base" / "checkpoints").mkdir(parents=True)
    (tmp_path / "old" / "base" / "checkpoints" / "phase0_step000010.pt").write_bytes(b"")  # not a failed start
    assert run.check(config, dumps(config), resume=True) == {}
    other = load_config(None, ["train.base=pretrained", "model.pretrained=weights.pt"])
    with pytest.raises(RunDirError, match="model.pretrained"):
        run.check(other, dumps(other), resume=True)
