"""The strategies' mechanisms on the tiny model and a small ShapeWorld stream, each against an
independent computation: Mod-X and LwF with weight 0 are fine-tuning, LwF's loss is the dense
distillation formula, EWC's penalty pins the weights, the ER reservoir is uniform and batches
hold the replay fraction, DER's embedding target stores the embeddings of the moment (EWC's
Fisher and DER's similarity-row target: tests/test_ewc_der.py), WiSE-FT interpolates exactly,
ZSCL averages its weights (its distillation:
tests/test_zscl.py); every [modx] option reaches the kernel; joint trains on
the union of the phases; er, der, ewc and zscl resume after SIGKILL as if never stopped; bad options are
refused."""
import copy
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from geomlab import train
from geomlab.config import resolve
from geomlab.data import DataError, build_stream
from geomlab.io import atomic_torch_save, load_checkpoint
from geomlab.kernels import ModxOptions, reference
from geomlab.strategies import Features, get_strategy

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.probe_size=8", "data.calibration_size=8", "data.shapes.domains=3", "data.shapes.train_size=32",
         "train.batch_size=16", "data.shapes.reference_size=40"]


def train_steps(trainer, start_weights, strategy_name, steps=4, phase=1, strategy_dir="s", trained=None):
    """(weights, logged parts) after each of `steps` steps of `phase` from `start_weights`, as the
    trainer's phase loop runs them (hooks included), seed 0; `trained` receives the weights each
    step leaves before end_phase."""
    trainer.model.load_state_dict(start_weights)
    torch.manual_seed(0)
    strategy = trainer.make_strategy(strategy_dir, strategy_name, phase)
    data = strategy.start_phase(trainer.model)
    optimizer = train.make_optimizer(trainer.model, trainer.config)
    weights, parts = [], []
    trainer.model.train()
    for step, (images, tokens) in enumerate(trainer.batches(data, strategy.step_indices, 0, steps)):
        _, logged = trainer.train_step(strategy, optimizer, images, tokens, step,
                                       train.lr_at(step, steps, trainer.config))
        strategy.after_step(trainer.model, step + 1)
        if trained is not None:
            trained.append(copy.deepcopy(trainer.model.state_dict()))
        if step + 1 == steps:
            strategy.end_phase(trainer.model)
        weights.append(copy.deepcopy(trainer.model.state_dict()))
        parts.append({k: float(v.detach()) for k, v in logged.items()})
    return weights, parts


def assert_same_weights(a, b):
    for step, (x, y) in enumerate(zip(a, b)):
        for key in x:
            assert torch.equal(x[key], y[key]), (step, key)


def moved(a, b) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name, key, on", [("modx", "alpha", 20.0), ("lwf", "weight", 1.0)])
def test_weight_zero_is_finetune_step_for_step(fresh, monkeypatch, name, key, on):
    start = fresh.initial
    finetune, _ = train_steps(fresh, start, "finetune")
    monkeypatch.setitem(fresh.config[name], key, 0.0)
    zero, parts = train_steps(fresh, start, name)
    assert_same_weights(finetune, zero)
    # The KL term was there to be switched off, and when on it moves the weights.
    assert any(p["kl_i2t"] > 0 for p in parts)
    monkeypatch.setitem(fresh.config[name], key, on)
    weighted, _ = train_steps(fresh, start, name)
    assert moved(finetune[-1], weighted[-1])


def unit(n, d, seed, dtype=torch.float32):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=1)


# Old features the phase-start model "gives" (stubbed): most rows retrieve their pair, row 7 does
# not (its caption duplicates row 6's), so the kept rows are neither none nor all. The current
# features have moved away from them.
IMAGE_OLD = unit(8, 16, 1)
TEXT_OLD = F.normalize(IMAGE_OLD + 0.3 * unit(8, 16, 2), dim=1)
TEXT_OLD[7] = TEXT_OLD[6]
FEATS = Features(image=F.normalize(IMAGE_OLD + unit(8, 16, 3), dim=1), text=F.normalize(TEXT_OLD + unit(8, 16, 4), dim=1),
                 image_all=None, text_all=None, logit_scale=torch.tensor(10.0))
FEATS.image_all, FEATS.text_all = FEATS.image, FEATS.text  # one process: the batch is its own columns

CHANGES = [("alpha", 5.0), ("temperature", 0.5), ("reduction", "mean"), ("reduction", "kept_mean"),
           ("off_diagonal_only", True)]


def modx_loss_from_config(trainer, monkeypatch, **options):
    """Mod-X built by the trainer from its [modx] section (with `options` set there): its loss on FEATS."""
    for key, value in options.items():
        monkeypatch.setitem(trainer.config["modx"], key, value)
    monkeypatch.setattr(train, "encode", lambda model, images, tokens: (IMAGE_OLD, TEXT_OLD))
    loss, parts = trainer.make_strategy("modx", "modx", 1).loss(None, None, FEATS, 0)
    return loss, parts


def test_every_modx_option_is_tested(trainer):
    assert {key for key, _ in CHANGES} == set(trainer.config["modx"])


@pytest.mark.parametrize("key, value", [(None, None), *CHANGES])
def test_modx_option_reaches_the_kernel(trainer, monkeypatch, key, value):
    default, parts = modx_loss_from_config(trainer, monkeypatch)
    assert 2 <= int(parts["kept_i2t"]) < 8 and 2 <= int(parts["kept_t2i"]) < 8
    options = {key: value} if key else {}
    loss, _ = modx_loss_from_config(trainer, monkeypatch, **options)
    o = trainer.config["modx"]
    # the Mod-X loss, dense: CLIP + α · ½ (KL_i2t + KL_t2i) with the options now in the config
    kl_i2t, kl_t2i, _, _ = reference.modx_kl_parts(
        FEATS.image, FEATS.text, IMAGE_OLD, TEXT_OLD,
        ModxOptions(temperature=o["temperature"], reduction=o["reduction"], off_diagonal_only=o["off_diagonal_only"]))
    expected = reference.clip_loss(FEATS.image, FEATS.text, FEATS.logit_scale) + o["alpha"] * 0.5 * (kl_i2t + kl_t2i)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6, abs=1e-7)
    if key:
        assert abs(float(loss) - float(default)) > 1e-3, (key, value)


def dense_distillation(image, text, image_old, text_old, s, weight, T):
    """CLIP + λ·½(KL_i2t + KL_t2i), KL(softmax(s·S'/T) ‖ softmax(s·S/T)) averaged over the rows
    (over the columns for text→image), every row, s detached inside the KL: plain autograd."""
    labels = torch.arange(image.shape[0])
    S, S_old = image @ text.T, image_old @ text_old.T
    clip = 0.5 * (F.cross_entropy(s * S, labels) + F.cross_entropy(s * S.T, labels))
    t = s.detach() / T

    def kl(M, M_old):
        return F.kl_div(F.log_softmax(t * M, 1), F.log_softmax(t * M_old, 1), log_target=True, reduction="batchmean")

    return clip + weight * 0.5 * (kl(S, S_old) + kl(S.T, S_old.T))


def test_lwf_loss_is_the_dense_distillation_value_and_gradient(trainer, monkeypatch):
    weight, T = 1.7, 2.0
    monkeypatch.setitem(trainer.config["lwf"], "weight", weight)
    monkeypatch.setitem(trainer.config["lwf"], "temperature", T)
    image_old, text_old = IMAGE_OLD.double(), TEXT_OLD.double()
    monkeypatch.setattr(train, "encode", lambda model, images, tokens: (image_old, text_old))
    lwf = trainer.make_strategy("lwf", "lwf", 1)
    results = []
    for compute in ("kernel", "dense"):
        i, t = FEATS.image.double().requires_grad_(), FEATS.text.double().requires_grad_()
        s = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        if compute == "kernel":
            loss, parts = lwf.loss(None, None, Features(i, t, i, t, s), 0)
            assert {"clip", "kl_i2t", "kl_t2i"} <= set(parts) and float(parts["kl_i2t"].detach()) > 0
        else:
            loss = dense_distillation(i, t, image_old, text_old, s, weight, T)
        loss.backward()
        results.append([loss.detach(), i.grad, t.grad, s.grad])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# --- EWC -----------------------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_its_gradient_is_weight_times_fisher_times_shift(fresh, monkeypatch):
    monkeypatch.setitem(fresh.config["ewc"], "fisher_batches", 2)
    monkeypatch.setitem(fresh.config["ewc"], "weight", 3.0)
    ewc = fresh.make_strategy("ewc", "ewc", 1)
    ewc.start_phase(fresh.model)
    saved = fresh.run.load_strategy_state("ewc", 1)
    fisher = {n: f for n, f in saved.items() if n.startswith("fisher.")}
    assert float(ewc.penalty().detach()) == 0.0
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    shift = {n: p.detach() - saved[f"anchor.{n}"] for n, p in fresh.model.named_parameters()}
    fresh.model.zero_grad(set_to_none=True)
    penalty = ewc.penalty()
    penalty.backward()
    want = 0.5 * 3.0 * sum(float((fisher[f"fisher.{n}"].double() * shift[n].double() ** 2).sum()) for n in shift)
    assert float(penalty.detach()) == pytest.approx(want, rel=1e-4) and want > 0
    for n, p in fresh.model.named_parameters():
        # (the token embedding's mostly unused rows are penalised through a sparse lookup)
        torch.testing.assert_close(p.grad.to_dense(), 3.0 * fisher[f"fisher.{n}"] * shift[n], rtol=1e-4, atol=1e-12)


def test_ewc_huge_weight_keeps_the_weights_at_the_anchor(fresh, monkeypatch):
    monkeypatch.setitem(fresh.config["ewc"], "fisher_batches", 2)
    monkeypatch.setitem(fresh.config["ewc"], "weight", 1e9)
    start = fresh.initial
    finetune, _ = train_steps(fresh, start, "finetune", steps=8)
    ewc, parts = train_steps(fresh, start, "ewc", steps=8)
    fisher = fresh.run.load_strategy_state("s", 1)

    def drift(weights):  # Σ F·(θ − θ*)²: how far the weights the Fisher says matter have moved
        return sum(float((fisher[f"fisher.{n}"] * (weights[n] - start[n]) ** 2).sum())
                   for n, _ in fresh.model.named_parameters())

    # Adam moves every weight by about lr in its first step whatever the loss; from then on the
    # penalty pulls the constrained weights back while fine-tuning keeps going (measured: 0.05×).
    assert parts[-1]["ewc"] > 0
    assert drift(ewc[-1]) < 0.15 * drift(finetune[-1]), (drift(ewc[-1]), drift(finetune[-1]))


# --- ER and DER ----------------------------------------------------------------------------------


def test_er_reservoir_is_a_uniform_sample_of_every_phase_seen(fresh, monkeypatch):
    """Offering the three phases' 96 samples to a 16-slot reservoir under 1500 seeds: each sample
    ends in the buffer equally often (chi-square), and the buffer fills before anything is replaced."""
    monkeypatch.setitem(fresh.config["er"], "buffer_size", 16)
    er = fresh.make_strategy("er", "er", 1)
    counts = Counter()
    for seed in range(1500):
        er.context = dataclasses.replace(er.context, seed=seed)
        state = er.empty_state()
        for phase in range(3):
            state = er.offer(fresh.model, state, phase)
            if phase == 0:  # 32 samples offered to 16 slots: full, from phase 0 only
                assert len(state["phase"]) == 16
        assert int(state["seen"]) == 96 and len(set(zip(state["phase"].tolist(), state["index"].tolist()))) == 16
        counts.update(zip(state["phase"].tolist(), state["index"].tolist()))
    observed = [counts[(p, i)] for p in range(3) for i in range(32)]
    assert sum(observed) == 1500 * 16
    assert scipy.stats.chisquare(observed).pvalue > 1e-3


def test_replay_batches_hold_the_configured_fraction_of_earlier_phases(fresh, monkeypatch):
    monkeypatch.setitem(fresh.config["er"], "buffer_size", 20)
    monkeypatch.setitem(fresh.config["er"], "replay_fraction", 0.25)
    fresh.make_strategy("er", "er", 1).start_phase(fresh.model)
    er = fresh.make_strategy("er", "er", 2)
    data = er.start_phase(fresh.model)
    state = fresh.run.load_strategy_state("er", 2)
    assert int(state["seen"]) == 64 and len(state["phase"]) == 20 and set(state["phase"].tolist()) == {0, 1}
    n = len(fresh.stream.phases[2].train)
    for step, (images, _) in enumerate(fresh.batches(data, er.step_indices, 0, 3)):
        rows = er.step_indices(step)
        assert len(rows) == 16 and [r >= n for r in rows] == [False] * 12 + [True] * 4
        for row, image in zip(rows, images):
            if row < n:
                want = fresh.stream.phases[2].train[row][0]
            else:
                p, i = int(state["phase"][row - n]), int(state["index"][row - n])
                want = fresh.stream.phases[p].train[i][0]
            assert torch.equal(image, want)


def embeddings_of(trainer, samples):
    """(image, text) embeddings of (phase, index) samples by the model as it is now, eval mode."""
    images, captions = [], []
    for p, i in samples:
        image, caption, _ = trainer.stream.phases[p].train[i]
        images.append(image)
        captions.append(caption)
    trainer.model.eval()
    with torch.no_grad():
        image = F.normalize(trainer.model.encode_image(torch.stack(images)), dim=-1)
        text = F.normalize(trainer.model.encode_text(trainer.tokenizer(captions)), dim=-1)
    trainer.model.train()
    return image, text


def test_der_embedding_target_stores_the_embeddings_of_the_model_at_insertion(fresh, monkeypatch):
    monkeypatch.setitem(fresh.config["der"], "buffer_size", 24)
    monkeypatch.setitem(fresh.config["der"], "target", "embedding")
    fresh.make_strategy("der", "der", 1).start_phase(fresh.model)
    first = fresh.run.load_strategy_state("der", 1)
    samples = list(zip(first["phase"].tolist(), first["index"].tolist()))
    image, text = embeddings_of(fresh, samples)
    torch.testing.assert_close(first["image"], image, rtol=0, atol=1e-6)
    torch.testing.assert_close(first["text"], text, rtol=0, atol=1e-6)
    # Phase 2 starts from other weights: the slots phase 1 fills get those weights' embeddings,
    # the slots still holding phase-0 samples keep the embeddings they were stored with.
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh.make_strategy("der", "der", 2).start_phase(fresh.model)
    second = fresh.run.load_strategy_state("der", 2)
    now = list(zip(second["phase"].tolist(), second["index"].tolist()))
    image, text = embeddings_of(fresh, now)
    kept = [j for j, s in enumerate(now) if s == samples[j]]
    replaced = [j for j, s in enumerate(now) if s != samples[j]]
    assert kept and replaced and all(now[j][0] == 1 for j in replaced)
    torch.testing.assert_close(second["image"][kept], first["image"][kept], rtol=0, atol=0)
    torch.testing.assert_close(second["image"][replaced], image[replaced], rtol=0, atol=1e-6)
    torch.testing.assert_close(second["text"][replaced], text[replaced], rtol=0, atol=1e-6)
    assert (second["image"][kept] - image[kept]).abs().max() > 1e-3  # the model did move


# --- WiSE-FT and ZSCL ----------------------------------------------------------------------------


def test_wise_alpha_one_is_finetune_and_alpha_zero_returns_the_phase_start_weights(fresh, monkeypatch):
    start = fresh.initial
    finetune, _ = train_steps(fresh, start, "finetune", steps=3)
    monkeypatch.setitem(fresh.config["wise"], "alpha", 1.0)
    one, _ = train_steps(fresh, start, "wise", steps=3)
    assert_same_weights(finetune, one)
    monkeypatch.setitem(fresh.config["wise"], "alpha", 0.0)
    zero, _ = train_steps(fresh, start, "wise", steps=3)
    assert_same_weights(finetune[:2], zero[:2])  # the fine-tuning path, then the interpolation
    assert_same_weights([start], zero[-1:])
    monkeypatch.setitem(fresh.config["wise"], "alpha", 0.25)
    quarter, _ = train_steps(fresh, start, "wise", steps=3)
    for key, value in start.items():
        if value.is_floating_point():
            torch.testing.assert_close(quarter[-1][key], 0.75 * value + 0.25 * finetune[-1][key])


def save_base(trainer, weights):
    atomic_torch_save(trainer.run.checkpoint_path("base", 0, 6), {"state_dict": weights, "phase": 0, "step": 6})


@pytest.mark.parametrize("steps", [4, 5])
def test_zscl_result_is_the_average_of_the_start_every_avg_freq_steps_and_the_end(fresh, monkeypatch, steps):
    monkeypatch.setitem(fresh.config["zscl"], "avg_freq", 2)
    monkeypatch.setitem(fresh.config["zscl"], "reference_batch_size", 8)
    save_base(fresh, fresh.initial)
    trained = []  # the weights each step leaves, before end_phase
    path, _ = train_steps(fresh, fresh.initial, "zscl", steps=steps, trained=trained)
    samples = [fresh.initial, trained[1], trained[3]] + ([trained[4]] if steps == 5 else [])
    for key, value in fresh.initial.items():
        if value.is_floating_point():  # θ_start, after steps 2 and 4, and after step 5 when it ends the phase
            torch.testing.assert_close(path[-1][key], sum(w[key] for w in samples) / len(samples), rtol=1e-5, atol=1e-6)
    assert moved(path[-1], trained[-1])


def write_csv(root: Path, name: str, images: list[int], captions: str = "a picture number {}") -> dict:
    from PIL import Image
    rows = ["filepath,title"]
    for i in images:
        Image.new("RGB", (16, 16), (40 * i % 256, 90, 200)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{captions.format(i)}")
    (root / name).write_text("\n".join(rows) + "\n")
    return {"name": name[:-4], "format": "csv", "path": name}


def test_datasets_stream_pools_reference_sources_held_out_from_train_and_probes(tmp_path):
    train_src, probe_src = write_csv(tmp_path, "train.csv", [0, 1, 2]), write_csv(tmp_path, "probe.csv", [3, 4])
    references = [write_csv(tmp_path, "ref.csv", [5, 6]), write_csv(tmp_path, "ref2.csv", [7])]

    def stream(*refs):
        sources = [train_src, {**probe_src, "role": "probe"}, *({**r, "role": "reference"} for r in refs)]
        data = resolve({"data": {"stream": "datasets", "root": str(tmp_path), "sources": sources,
                                 "calibration_size": 0}})["data"]
        return build_stream("datasets", data, image_size=32, preprocess=None, seed=0)

    s = stream(*references)
    assert [s.reference[i][1] for i in range(len(s.reference))] == [f"a picture number {i}" for i in (5, 6, 7)]
    assert len(s.phases) == 1 and len(s.probes) == 1 and stream().reference is None
    with pytest.raises(ValueError, match="zscl needs a reference set"):
        get_strategy("zscl").check_stream(stream())
    for shared in (1, 4):  # an image of the train source, one of the probe source
        bad = write_csv(tmp_path, "bad.csv", [shared], "another caption {}")
        with pytest.raises(DataError, match=rf"{shared}\.png: image is in both reference source 'bad'"):
            stream(bad)


def sample_ids(dataset):
    return [dataset[i][2] for i in range(len(dataset))]


def test_joint_trains_on_the_union_of_the_phases_so_far(trainer):
    phases = [sample_ids(p.train) for p in trainer.stream.phases]
    assert len(phases) == 3 and all(phases)
    joint, finetune = get_strategy("joint"), get_strategy("finetune")
    for p in range(3):
        union = [i for ids in phases[: p + 1] for i in ids]
        assert sorted(sample_ids(joint.train_data(trainer.stream, p))) == sorted(union)
        assert sample_ids(finetune.train_data(trainer.stream, p)) == phases[p]


# --- end to end: resume, bad input ---------------------------------------------------------------

RESUME = ["--strategies", "er,der,ewc,zscl", "data.probe_size=4", "data.calibration_size=4", "data.shapes.domains=2",
          "data.shapes.train_size=32", "train.batch_size=16", "train.base_steps=2", "train.steps=6",
          "train.checkpoint_every=2", "train.log_every=2", "er.buffer_size=16", "der.buffer_size=16", "der.beta=0.5",
          "ewc.fisher_batches=2", "data.shapes.reference_size=4", "data.shapes.reference_texts=16",
          "zscl.reference_batch_size=4", "zscl.avg_freq=4"]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "geomlab.train", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def kill_inside(out: Path, strategy: str, args) -> None:
    """Start the run (resuming), SIGKILL it once `strategy` has saved a state inside phase 1."""
    proc = subprocess.Popen([sys.executable, "-m", "geomlab.train", "--out", str(out), "--resume", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, deadline = out / strategy / "state.pt", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            saved = load_checkpoint(state) if state.exists() else None
        except ValueError:  # being replaced right now
            saved = None
        if saved is not None and saved["phase"] == 1 and 0 < saved["step"] < 6:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    saved = load_checkpoint(state)
    assert saved["phase"] == 1 and 0 < saved["step"] < 6, f"the kill must land inside {strategy}'s phase 1"


def test_er_der_ewc_zscl_resume_after_sigkill_mid_phase_match_an_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = run_cli("--out", str(whole), *RESUME)
    assert done.returncode == 0, done.stderr[-2000:]
    for strategy in ("er", "der", "ewc", "zscl"):  # each killed inside phase 1, with its buffer, Fisher or
        kill_inside(cut, strategy, RESUME)          # running average saved
        assert strategy == "zscl" or (cut / strategy / "strategy_state" / "phase1.safetensors").is_file()
    resumed = run_cli("--out", str(cut), "--resume", *RESUME)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for strategy in ("er", "der", "ewc", "zscl"):
        a, b = (load_checkpoint(d / strategy / "checkpoints" / "phase1_step000006.pt")["state_dict"]
                for d in (whole, cut))
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-6, (strategy, worst)


@pytest.mark.parametrize("args, names", [
    (["er.buffer=3"], "er.buffer"),
    (["lwf.weight=-1"], "lwf.weight"),
    (["ewc.weight=-0.5"], "ewc.weight"),
    (["der.alpha=-1"], "der.alpha"),
    (["er.replay_fraction=1.0"], "er.replay_fraction"),
    (["der.replay_fraction=-0.1"], "der.replay_fraction"),
    (["er.buffer_size=0"], "er.buffer_size"),
    (["wise.alpha=1.5"], "wise.alpha"),
    (["--strategies", "zscl", "data.shapes.reference_size=0"], "reference"),
    (["--strategies", "zscl", "data.shapes.reference_texts=0"], "reference_texts"),
])
def test_bad_strategy_options_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists()
