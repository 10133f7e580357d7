"""geomlab.disorder: the analyser's "Disorder or loss?" on traces built by hand (known rotations and
known losses), checked against independent computations."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from geomlab import disorder
from geomlab.geometry import lead_lag, rotation_angles
from geomlab.traces import DomainEmbeddings, Trace, read_trace, write_trace


def _orthogonal(d: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _pairs(n: int, d: int, seed: int, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    return image, text


def _emb(image, text) -> DomainEmbeddings:
    return DomainEmbeddings(image=image.float(), text=text.float(), ids=torch.arange(image.shape[0]))


@dataclass
class _Ck:
    key: str
    label: str


def _run_of(domains_by_row: list[dict]) -> tuple[list, dict]:
    cks = [_Ck(f"k{t}", f"phase {t}") for t in range(len(domains_by_row))]
    traces = {c.key: (Trace(domains=d, phase=t, step=0, model="m"), "trace") for t, (c, d) in
              enumerate(zip(cks, domains_by_row))}
    return cks, traces


def test_loss_split_divides_the_loss_in_the_share_proportions():
    entry = {"now": 0.2, "base": 0.6,
             "cross_orthogonal": {"share": 0.25}, "modality_orthogonal": {"share": 0.5}, "cross_linear": {"share": 0.75}}
    split = disorder.loss_split(entry)
    assert split["lost"] == pytest.approx(0.4)
    assert split["rotation"] == pytest.approx(0.4 * 0.5)
    assert split["linear_only"] == pytest.approx(0.4 * 0.25)
    assert split["not_recovered"] == pytest.approx(0.4 * 0.25)
    # a map that makes retrieval worse recovers nothing; one that beats the reference, everything
    entry.update(cross_orthogonal={"share": -0.3}, modality_orthogonal={"share": None}, cross_linear={"share": 1.4})
    split = disorder.loss_split(entry)
    assert (split["rotation"], split["linear_only"], split["not_recovered"]) == pytest.approx((0.0, 0.4, 0.0))
    entry.update(cross_orthogonal={"share": None}, cross_linear={"share": None})
    assert disorder.loss_split(entry) is None  # nothing lost: no split


def test_a_turned_text_space_is_all_recovered_by_rotation_and_lost_information_by_nothing():
    d, n, cal = 16, 120, 200
    image, text = _pairs(n, d, 0)
    cal_image, cal_text = _pairs(cal, d, 1)
    q = _orthogonal(d, 2)
    base = {"d0": _emb(image, text), "d0/calibration": _emb(cal_image, cal_text)}
    turned = {"d0": _emb(image, text @ q), "d0/calibration": _emb(cal_image, cal_text @ q)}
    # information gone: captions replaced by independent directions (calibration too)
    g = torch.Generator().manual_seed(3)
    gone = {"d0": _emb(image, F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)),
            "d0/calibration": _emb(cal_image, F.normalize(torch.randn(cal, d, generator=g, dtype=torch.float64), dim=-1))}
    cks, traces = _run_of([base, turned, gone])
    # the scored probe sets alone: their calibration sets are found in the traces by name
    out = disorder.realignment_rows(cks, traces, ["d0"], ["seen"], [0], [0, 1, 2])
    rows = out["probes"]["d0"]["rows"]
    assert [r["row"] for r in rows] == [1, 2]
    turned_row, gone_row = rows
    assert turned_row["now"] < turned_row["base"]                       # the turn lost retrieval
    assert turned_row["cross_orthogonal"]["share"] == pytest.approx(1.0, abs=1e-6)
    split = disorder.loss_split(gone_row)
    assert out["probes"]["d0"]["split"] == split                          # the split is the last row's
    assert split["not_recovered"] > 0.8 * split["lost"]
    assert set(out["probes"]) == {"d0"}
    # a NaN in a calibration split is refused, naming the checkpoints and the set
    bad = traces["k1"][0].domains["d0/calibration"]
    bad.text[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"phase 0 → phase 1, probe set 'd0' and 'd0/calibration'"):
        disorder.realignment_rows(cks, traces, ["d0"], ["seen"], [0], [0, 1, 2])
    # a probe set whose calibration split some trace lacks (a run from before they existed) is left out
    del traces["k2"][0].domains["d0/calibration"]
    assert disorder.realignment_rows(cks, traces, ["d0"], ["seen"], [0], [0, 1, 2]) is None


def _fine_run(tmp_path: Path, seed: int) -> "disorder_run":
    """A base phase and one later phase of fine traces: the text of d0 turns a little more at every
    trace from trace 3 on, and its R@1 follows one trace later (pairs shuffled)."""
    d, n = 12, 40
    image, text = _pairs(n, d, 10 + seed, noise=0.2)
    run = _FakeRun(tmp_path / f"seed{seed}")
    write = lambda sd, phase, step, img, txt: run.write(sd, phase, step, {"d0": _emb(img, txt)})  # noqa: E731
    for step in (0, 10, 20):
        write("base", 0, step, image, text)
    g = torch.Generator().manual_seed(seed)
    angle, shuffled = 0.0, 0
    for k, step in enumerate(range(0, 120, 10)):
        if k >= 3:
            angle += 0.05 + 0.02 * float(torch.rand(1, generator=g))
        q = torch.matrix_exp(angle * (_orthogonal(d, 5) - _orthogonal(d, 5).T) / 2)
        txt = F.normalize(text @ q, dim=-1)
        if k >= 4:
            shuffled = min(n, shuffled + 3)
        perm = torch.arange(n)
        perm[:shuffled] = torch.roll(perm[:shuffled], 1)
        write("finetune", 1, step, image, txt[perm])
    return run


class _FakeRun:
    """A directory of fine traces laid out as a run's, with RunDir's reading interface."""

    def __init__(self, root: Path):
        self.root = root

    def write(self, strategy_dir, phase, step, domains):
        path = self.root / strategy_dir / "fine_traces" / f"phase{phase}_step{step:06d}.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_trace(path, Trace(domains=domains, phase=phase, step=step, model="m"))

    def fine_traces(self, strategy_dir):
        out = []
        for p in (self.root / strategy_dir / "fine_traces").glob("*.safetensors"):
            phase, step = p.stem.split("_")
            out.append((int(phase[5:]), int(step[4:]), p))
        return sorted(out)


def test_fine_series_reads_r1_and_geometry_against_the_learning_model(tmp_path):
    run = _fine_run(tmp_path, 0)
    out = disorder.fine_series(run, "finetune", ["d0"], ["seen"], [0])
    s = out["probes"]["d0"]
    assert out["trace_every"] == 10 and s["learned_at"] == 0 and s["rows"] == 40
    assert s["phase"] == [1] * 12 and s["step"] == list(range(0, 120, 10))
    ref = read_trace(run.fine_traces("base")[-1][2]).domains["d0"]
    for k, (_, _, path) in enumerate(run.fine_traces("finetune")):
        e = read_trace(path).domains["d0"]
        sims = e.image.double() @ e.text.double().T
        i2t = (sims.argmax(1) == torch.arange(40)).double().mean()
        t2i = (sims.argmax(0) == torch.arange(40)).double().mean()
        assert s["r1"][k] == pytest.approx(float((i2t + t2i) / 2))
        assert s["rotation_text"][k] == pytest.approx(float(rotation_angles(ref.text, e.text).mean()))
        assert s["rotation_image"][k] == pytest.approx(0.0, abs=1e-3)
    assert s["lead_lag"]["rotation_text"] == lead_lag(s["rotation_text"], s["r1"], max_lag=disorder.MAX_LAG)
    # no fine traces: no series
    assert disorder.fine_series(_FakeRun(tmp_path / "empty"), "finetune", ["d0"], ["seen"], [0]) is None


def test_aggregate_over_seeds_gives_cis_and_a_forecast_only_with_two_seeds(tmp_path):
    entries = [{"realignment": None, "series": disorder.fine_series(_fine_run(tmp_path, s), "finetune", ["d0"],
                                                                    ["seen"], [0])} for s in range(3)]
    one = disorder.aggregate(entries[:1], [0])
    assert one["forecast"] is None and one["lead_lag"]["rotation_text"]["lag"]["ci"] is None
    three = disorder.aggregate(entries, [0, 1, 2])
    lags = [e["series"]["probes"]["d0"]["lead_lag"]["rotation_text"]["lag"] for e in entries]
    assert three["lead_lag"]["rotation_text"]["lag"]["mean"] == pytest.approx(sum(lags) / 3)
    f = three["forecast"]
    assert f["seeds"] == [0, 1, 2] and all(w > 0 for w in f["windows"])
    assert all(math.isfinite(e) for e in f["error_history"] + f["error_geometry"])
    line = disorder.summary_line("finetune", three)
    assert line.startswith("  finetune   disorder or loss:") and "forecast RMSE" in line


def test_bench_analyze_reports_what_disorder_or_loss_adds(tmp_path):
    from geomlab import bench
    out = tmp_path / "bench.json"
    assert bench.main(["analyze", "--json", str(out), "--strategies", "2", "--checkpoints", "3", "--domains", "3",
                       "--n", "30", "--dim", "8", "--calibration", "32", "--fine-rows", "8", "--skip-drift"]) == 0
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    row = rows["analyze + disorder or loss"]
    # per strategy three realignments: domain0 at the ends of phases 1 and 2, domain1 at the end of phase 2
    assert row["seconds"] > 0 and "6 realignments" in row["note"]


def test_disorder_scalars_of_no_rows_is_refused_not_nan():
    from geomlab.geometry import disorder_scalars
    empty = (torch.zeros(0, 8), torch.zeros(0, 8))
    with pytest.raises(ValueError, match="no rows"):
        disorder_scalars(empty, empty)


@pytest.mark.parametrize("n, d, captions", [(6, 16, 1), (40, 8, 1), (5, 12, 3)])
def test_disorder_scalars_series_equals_spatial_disorders_numbers(n, d, captions):
    """The batched series (one reference, several later traces) gives, per trace, spatial_disorder's
    mean rotations, mean desynchronisation and mean alignment drift: with fewer rows than dimensions
    (a fine trace's rank-deficient Procrustes), more, and several captions per image; one trace
    whose text side did not move (rank deficient in another way) among them."""
    from geomlab.geometry import disorder_scalars, disorder_scalars_series, spatial_disorder
    g = torch.Generator().manual_seed(n * d)
    caption_image = torch.arange(n).repeat_interleave(captions)
    a = (torch.randn(n, d, generator=g), torch.randn(n * captions, d, generator=g), caption_image)
    bs = [(a[0] + s * torch.randn(n, d, generator=g), a[1] + s * torch.randn(n * captions, d, generator=g), caption_image)
          for s in (0.1, 0.5, 2.0)]
    bs.append((a[0] + 0.3 * torch.randn(n, d, generator=g), a[1].clone(), caption_image))
    series = disorder_scalars_series(a, bs)
    for b, got in zip(bs, series):
        full = spatial_disorder(a, b)
        want = {"rotation_image": full["rotation"]["image"]["mean"], "rotation_text": full["rotation"]["text"]["mean"],
                "desync": full["deviation"]["desync"]["mean"],
                "alignment_drift": full["deviation"]["alignment_drift"]["mean"]}
        assert got == pytest.approx(want, rel=1e-9, abs=1e-7)
        assert disorder_scalars(a, b) == pytest.approx(got, rel=1e-12, abs=1e-9)
    assert disorder_scalars_series(a, []) == []


def test_disorder_scalars_series_refuses_a_zero_row_inside_one_trace():
    from geomlab.geometry import disorder_scalars_series
    a = (torch.randn(6, 16), torch.randn(6, 16))
    zero_row = torch.randn(6, 16).index_fill(0, torch.tensor([1]), 0.0)
    with pytest.raises(ValueError, match=r"disorder_scalars: 1 of 24 rows of image_b are zero"):
        disorder_scalars_series(a, [a, a, (zero_row, a[1]), a])
