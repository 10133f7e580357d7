"""The accuracy matrix's mapping (each probe set -> the phase it is learned at) and the metrics read
off it: Last, Avg, BWT, forgetting, Transfer (docs/definitions.md, "Accuracy matrix" and "Forgetting
and BWT"), by hand, and through the analyser on the paper configs' layouts."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from geomlab import geometry as G
from geomlab import train
from geomlab.analyze import main as analyze_main
from geomlab.config import load_config, resolve
from geomlab.data import DataError, build_stream
from geomlab.data.phases import layout
from geomlab.rundir import RunDir
from geomlab.traces import DomainEmbeddings, Trace, write_trace

ROOT = Path(__file__).resolve().parents[1]
NAN = float("nan")


def same(a, b) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, abs=1e-12) for x, y in zip(a, b))


# ----------------------------------------------------------------------------- the metrics by hand


def test_metrics_by_hand():
    # three phases, probe sets learned at 0, 1, 2, and one no phase trains on
    A = [[0.9, 0.1, 0.0, 0.3],
         [0.6, 0.8, 0.1, 0.35],
         [0.5, 0.7, 0.9, 0.4]]
    learned = [0, 1, 2, None]
    assert same(G.forgetting(A, learned).tolist(), [0.9 - 0.5, 0.8 - 0.7, NAN, NAN])
    assert G.bwt(A, learned) == pytest.approx(((0.5 - 0.9) + (0.7 - 0.8)) / 2)
    assert G.last_accuracy(A) == pytest.approx((0.5 + 0.7 + 0.9 + 0.4) / 4)
    assert G.average_accuracy(A, learned) == pytest.approx((0.9 + (0.6 + 0.8) / 2 + (0.5 + 0.7 + 0.9) / 3) / 3)
    # not yet trained on: (t=0, p1), (0, p2), (1, p2); never trained on: every row of p3
    assert G.transfer(A, learned) == pytest.approx((0.1 + 0.0 + 0.1 + 0.3 + 0.35 + 0.4) / 6)
    m = G.continual_metrics(A, learned)
    assert m["mean_forgetting"] == pytest.approx((0.4 + 0.1) / 2) and m["bwt"] == G.bwt(A, learned)
    # forgetting counts only rows at or after t_p: p1 rose from 0.1 (before it was trained) to 0.8
    assert G.forgetting([[0.9, 0.95], [0.8, 0.6], [0.7, 0.5]], [0, 1]).tolist()[1] == pytest.approx(0.6 - 0.5)
    # the metrics follow the mapping, not the column order
    perm = [2, 0, 3, 1]
    Ap, lp = [[row[p] for p in perm] for row in A], [learned[p] for p in perm]
    assert G.bwt(Ap, lp) == G.bwt(A, learned) and G.transfer(Ap, lp) == pytest.approx(G.transfer(A, learned))
    assert G.average_accuracy(Ap, lp) == pytest.approx(G.average_accuracy(A, learned))
    assert same(G.forgetting(Ap, lp).tolist(), [G.forgetting(A, learned).tolist()[p] for p in perm])
    # without a mapping only Last exists; nothing is learned before T = 0
    none = G.continual_metrics(A, None)
    assert none["last"] == G.last_accuracy(A) and all(math.isnan(none[k]) for k in ("avg", "bwt", "transfer"))
    assert math.isnan(G.bwt([[0.4, 0.5]], [0, 0])) and math.isnan(G.transfer(A, [0, 0, 0, 0]))
    with pytest.raises(ValueError, match="4 probe sets"):
        G.bwt(A, [0, 1])


# ----------------------------------------------------------------------------- the stream records it


def test_paper_configs_map_probe_sets_to_their_sources_phases():
    c2f = layout(load_config(ROOT / "experiments" / "coco_to_flickr30k.toml")["data"])
    assert c2f == (["coco", "flickr30k"], {"flickr30k_test": (1,), "coco_test": (0,)})
    five = layout(load_config(ROOT / "experiments" / "flickr30k_5phase.toml")["data"])
    assert five == (["coco", *[f"flickr30k_{p}of5" for p in range(1, 6)]],
                    {"flickr30k_test": (1, 2, 3, 4, 5), "coco_test": (0,)})


def write_png(path: Path, i: int) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(i)
    Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(path)


def write_csv(root: Path, name: str, first: int, n: int) -> None:
    rows = ["filepath,title,domain"]
    for i in range(first, first + n):
        write_png(root / "img" / f"{i}.png", i)
        rows.append(f"img/{i}.png,picture {i},{'indoor' if i % 2 else 'outdoor'}")
    (root / f"{name}.csv").write_text("\n".join(rows) + "\n")


def test_built_stream_records_the_same_mapping_as_the_layout(tmp_path):
    """A key-split probe measuring a key-split train source maps value to value; a probe measuring
    nothing maps to no phase; the stream built from real files agrees with `layout`."""
    write_csv(tmp_path, "base", 0, 4)
    write_csv(tmp_path, "train", 10, 6)
    write_csv(tmp_path, "probe", 30, 4)
    write_csv(tmp_path, "other", 50, 2)
    src = [{"name": "base", "format": "csv", "path": "base.csv"},
           {"name": "rooms", "format": "csv", "path": "train.csv", "key": "domain",
            "key_values": ["outdoor", "indoor"]},
           {"name": "rooms_test", "format": "csv", "path": "probe.csv", "role": "probe", "key": "domain",
            "key_values": ["indoor", "outdoor"], "measures": ["rooms"]},
           {"name": "all_test", "format": "csv", "path": "probe.csv", "role": "probe", "measures": ["base", "rooms"]},
           {"name": "other", "format": "csv", "path": "other.csv", "role": "probe"}]
    data = resolve({"data": {"stream": "datasets", "root": str(tmp_path), "sources": src,
                             "calibration_size": 0}})["data"]
    phases, mapping = layout(data)
    assert phases == ["base", "rooms_outdoor", "rooms_indoor"]
    assert mapping == {"rooms_test_indoor": (2,), "rooms_test_outdoor": (1,), "all_test": (0, 1, 2), "other": ()}
    stream = build_stream("datasets", data, image_size=16, preprocess=None, seed=0)
    assert [p.name for p in stream.phases] == phases
    assert {p.name: p.phases for p in stream.probes} == mapping
    assert [p["phases"] for p in stream.info["probe_sets"]] == [list(mapping[p.name]) for p in stream.probes]
    # a key split known only from the data has no layout before the data is read
    data["sources"][1]["key_values"] = []
    with pytest.raises(DataError, match="key_values"):
        layout(data)


@pytest.mark.parametrize("measures, role, needle", [
    (["flickr"], "probe", "'flickr' is not a train source"),
    (["base"], "train", "only a probe source"),
])
def test_bad_measures_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, measures, role, needle):
    write_csv(tmp_path, "base", 0, 4)
    write_csv(tmp_path, "probe", 30, 4)
    src = [{"name": "base", "format": "csv", "path": "base.csv"},
           {"name": "test", "format": "csv", "path": "probe.csv", "role": "probe"}]
    src[0 if role == "train" else 1]["measures"] = measures
    cfg = tmp_path / "exp.toml"
    lines = ['[data]', 'stream = "datasets"', f'root = "{tmp_path}"']
    for s in src:
        lines += ["[[data.sources]]", *[f"{k} = {json.dumps(v)}" for k, v in s.items()]]
    cfg.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert train.main(["--config", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err and ".measures" in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- through the analyser


def exact_r1(n: int, correct: int) -> DomainEmbeddings:
    """n pairs whose image→text and text→image R@1 are both correct / n, exactly: one-hot images;
    the first `correct` captions on their own image, the others each on the next wrong image."""
    image = torch.eye(n, n + 1)
    wrong = list(range(correct, n))
    target = list(range(correct)) + wrong[1:] + wrong[:1]
    return DomainEmbeddings(image=image, text=image[target].clone(), ids=torch.arange(n))


def write_run(root: Path, config: str, columns: dict, probe_phases: bool = True, completed=None) -> list[str]:
    """A finetune run of `config`'s layout whose phase-t checkpoint has R@1 columns[probe][t] on each
    probe set (the base checkpoint is phase 0). Returns the probe sets in stream order."""
    phases, mapping = layout(load_config(ROOT / "experiments" / config)["data"])
    run = RunDir(root)
    probes = list(mapping)
    assert sorted(probes) == sorted(columns)
    for t in range(len(phases)):
        domains = {p: exact_r1(100, round(100 * columns[p][t])) for p in probes}
        write_trace(run.trace_path("base" if t == 0 else "finetune", t, 10),
                    Trace(domains=domains, phase=t, step=10, model="geomlab-tiny"))
    info = {"strategies": ["finetune"], "phases": phases, "probes": probes,
            "completed": completed or {"base": [0], "finetune": list(range(1, len(phases)))}}
    if probe_phases:
        info["probe_phases"] = {p: list(v) for p, v in mapping.items()}
    (root / "run.json").write_text(json.dumps(info))
    return probes


def analysed(root: Path) -> tuple[dict, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert analyze_main([str(root), "--no-report"]) == 0
    return json.loads((root / "analysis" / "analysis.json").read_text()), out.getvalue()


def test_coco_to_flickr30k_fine_tuning_trace(tmp_path):
    """The issue's trace: COCO R@1 0.87 -> 0.13, Flickr 0.02 -> 0.90. The columns are
    [flickr30k_test, coco_test] while phase 0 trains COCO."""
    probes = write_run(tmp_path, "coco_to_flickr30k.toml", {"coco_test": [0.87, 0.13], "flickr30k_test": [0.02, 0.90]})
    a, out = analysed(tmp_path)
    assert a["source"]["run"]["probe_phases"] == {"flickr30k_test": [1], "coco_test": [0]}
    acc = a["strategies"]["finetune"]["accuracy"]
    assert probes == a["domains"] == acc["domains"] == ["flickr30k_test", "coco_test"]
    assert np.allclose(acc["matrix"], [[0.02, 0.87], [0.90, 0.13]], atol=1e-9)
    assert acc["learned_at"] == [1, 0]
    # GEM: BWT over the probe sets learned before the last phase, COCO alone: A[1][coco] − A[0][coco]
    assert acc["bwt"] == pytest.approx(0.13 - 0.87) == pytest.approx(-0.74)
    # (pairing row d with column d instead gives A[1][0] − A[0][0] = 0.90 − 0.02 = +0.88)
    assert acc["forgetting"][1] == pytest.approx(0.87 - 0.13) and acc["forgetting"][0] is None
    assert acc["mean_forgetting"] == pytest.approx(0.74)
    assert acc["last"] == pytest.approx((0.90 + 0.13) / 2)
    assert acc["avg"] == pytest.approx((0.87 + (0.90 + 0.13) / 2) / 2)   # phase 0: COCO only; phase 1: both
    assert acc["transfer"] == pytest.approx(0.02)                        # Flickr before its phase
    assert acc["domain0"] == {"probes": ["coco_test"], "r1": pytest.approx(0.13)}
    assert acc["last_domain"] == {"probes": ["flickr30k_test"], "r1": pytest.approx(0.90)}
    assert (f"finetune     Last {acc['last']:.3f}  Avg {acc['avg']:.3f}  BWT -0.740  forgetting 0.740  Transfer 0.020"
            "  | coco_test vs base") in out


def test_flickr30k_5phase_fine_tuning_trace(tmp_path):
    """Five Flickr phases after the COCO base phase, one Flickr probe: learned at phase 5."""
    coco = [0.87, 0.60, 0.45, 0.30, 0.20, 0.13]
    flickr = [0.02, 0.50, 0.70, 0.80, 0.86, 0.90]
    write_run(tmp_path, "flickr30k_5phase.toml", {"coco_test": coco, "flickr30k_test": flickr})
    a, out = analysed(tmp_path)
    acc = a["strategies"]["finetune"]["accuracy"]
    assert acc["domains"] == ["flickr30k_test", "coco_test"] and acc["learned_at"] == [5, 0]
    assert np.allclose(acc["matrix"], np.array([flickr, coco]).T, atol=1e-9)
    assert acc["bwt"] == pytest.approx(0.13 - 0.87)
    assert acc["forgetting"] == [None, pytest.approx(0.87 - 0.13)]
    assert acc["last"] == pytest.approx((0.90 + 0.13) / 2)
    # Avg: phases 0-4 see COCO only (Flickr is learned at 5), phase 5 sees both
    assert acc["avg"] == pytest.approx((sum(coco[:5]) + (0.13 + 0.90) / 2) / 6)
    assert acc["transfer"] == pytest.approx(sum(flickr[:5]) / 5)
    assert acc["domain0"]["probes"] == ["coco_test"] and acc["last_domain"]["probes"] == ["flickr30k_test"]
    h = a["strategies"]["finetune"]
    assert "| coco_test vs base" in out and h["vs_base"][-1]["coco_test"] is not None


@pytest.mark.parametrize("why", ["no probe_phases in run.json", "a phase end is missing"])
def test_without_a_mapping_only_last_is_reported(tmp_path, why):
    """Nothing is guessed: a run that does not map its probe sets to phases, or whose rows are not
    phases 0..T, gets Last and null for every metric that needs the mapping."""
    columns = {"coco_test": [0.87, 0.60, 0.45, 0.30, 0.20, 0.13],
               "flickr30k_test": [0.02, 0.50, 0.70, 0.80, 0.86, 0.90]}
    if why.startswith("no"):
        write_run(tmp_path, "flickr30k_5phase.toml", columns, probe_phases=False)
    else:  # phase 3 never completed: its last checkpoint is not a phase end
        write_run(tmp_path, "flickr30k_5phase.toml", columns, completed={"base": [0], "finetune": [1, 2, 4, 5]})
    a, out = analysed(tmp_path)
    acc = a["strategies"]["finetune"]["accuracy"]
    assert acc["last"] == pytest.approx((0.90 + 0.13) / 2) and acc["learned_at"] is None
    assert [acc[k] for k in ("avg", "bwt", "transfer", "mean_forgetting", "domain0", "last_domain")] == [None] * 6
    assert acc["forgetting"] == [None, None]
    assert "BWT n/a" in out and "| flickr30k_test vs base" in out  # the first probe set, named, not "domain 0"
