"""lora, cclip and nsp on the tiny model against independent computations: LoRA starts at the
phase-start model, trains only its adapters (and the logit scale), and merged computes what the
adapter model computes; its checkpoints load with open_clip alone; CKC is the dense formula (value
and gradient); nsp's covariance is the layers' inputs (out_proj's recomputed input reproduces the
attention's output), its projector a numpy eigendecomposition, threshold 1 is finetune step for
step and a small threshold keeps the earlier inputs' outputs; the three resume after SIGKILL and
run under torchrun as on one process; bad options are refused in one line."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geomlab import train
from geomlab.io import load_checkpoint
from geomlab.strategies.cclip import ckc_loss
from geomlab.strategies.nsp import COVARIANCE_ORDER, projected_layers, record_inputs

from test_strategies import ROOT, assert_same_weights, kill_inside, run_cli, train_steps
from test_train import one_process_and_torchrun

SMALL = ["data.probe_size=8", "data.calibration_size=8", "data.shapes.domains=3", "data.shapes.train_size=32",
         "train.batch_size=16", "data.shapes.reference_size=40"]


def outputs(model, trainer):
    data = trainer.stream.phases[1].train
    images, tokens = trainer.load_batch(data, list(range(8)))
    model.eval()
    with torch.no_grad():
        image, text, _ = model(images, tokens)[:3]
    model.train()
    return image, text


# --- lora ----------------------------------------------------------------------------------------


def test_lora_starts_at_the_phase_start_trains_only_adapters_and_merged_computes_the_same(fresh):
    model, start = fresh.model, copy.deepcopy(fresh.model.state_dict())
    before, plain = outputs(model, fresh), copy.deepcopy(model)
    lora = fresh.make_strategy("lora", "lora", 1)
    data = lora.start_phase(model)
    for a, b in zip(before, outputs(model, fresh)):  # B = 0: exactly the phase-start model
        assert torch.equal(a, b)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable - {"logit_scale"}) and "logit_scale" in trainable
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = train.make_optimizer(model, fresh.config)
    for step, (images, tokens) in enumerate(fresh.batches(data, lora.step_indices, 0, 3)):
        fresh.train_step(lora, optimizer, images, tokens, step, 1e-3)
        lora.after_step(model, step + 1)
    changed = [n for n, p in model.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    assert not changed, [(n, float((dict(model.named_parameters())[n] - frozen[n]).abs().max())) for n in changed]
    adapted = outputs(model, fresh)
    weights = lora.checkpoint_weights(model)
    assert set(weights) == set(start)  # open_clip's keys, no adapter or base_layer key
    lora.end_phase(model)
    assert set(model.state_dict()) == set(start) and all(p.requires_grad for p in model.parameters())
    for a, b in zip(adapted, outputs(model, fresh)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    plain.load_state_dict(weights)
    for a, b in zip(adapted, outputs(plain, fresh)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    moved = [k for k in start if not torch.equal(start[k], model.state_dict()[k])]
    assert any("in_proj_weight" in k for k in moved) and any("c_fc.weight" in k for k in moved)


def test_cclip_merges_half_the_adapters_update_and_drops_its_projector(fresh):
    model, start = fresh.model, copy.deepcopy(fresh.model.state_dict())
    cclip = fresh.make_strategy("cclip", "cclip", 1)
    cclip.start_phase(model)
    assert hasattr(model, "ckc_projector")
    with torch.no_grad():  # a nonzero update, then the phase end merges α = 0.5 of it
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    whole = cclip.checkpoint_weights(model)
    cclip.end_phase(model)
    half = model.state_dict()
    assert set(half) == set(start) and not hasattr(model, "ckc_projector")
    for k in start:
        torch.testing.assert_close(half[k] - start[k], 0.5 * (whole[k] - start[k]), rtol=0, atol=1e-6)


def test_ckc_is_the_dense_formula_in_value_and_gradient():
    rng = np.random.default_rng(0)
    n2, d, tau = 10, 6, 0.07
    c = rng.standard_normal((n2, d)); c /= np.linalg.norm(c, axis=1, keepdims=True)
    p = rng.standard_normal((n2, d)); p /= np.linalg.norm(p, axis=1, keepdims=True)
    s = c @ p.T / tau

    def log_softmax(m):
        m = m - m.max(1, keepdims=True)
        return m - np.log(np.exp(m).sum(1, keepdims=True))

    want = -0.5 * (np.mean(np.diag(log_softmax(s))) + np.mean(np.diag(log_softmax(s.T))))
    # d/dc of ½·mean CE(rows of S) + ½·mean CE(rows of Sᵀ), S = c pᵀ / τ
    soft_rows, soft_cols = np.exp(log_softmax(s)), np.exp(log_softmax(s.T)).T
    grad = (soft_rows - np.eye(n2)) @ p / (2 * n2 * tau) + (soft_cols - np.eye(n2)) @ p / (2 * n2 * tau)
    current = torch.tensor(c, requires_grad=True)
    got = ckc_loss(current.double(), torch.tensor(p), tau)
    got.backward()
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(current.grad.numpy(), grad, rtol=1e-4, atol=1e-7)


def test_a_lora_checkpoint_loads_with_open_clip_alone(fresh, tmp_path):
    lora = fresh.make_strategy("lora", "lora", 1)
    lora.start_phase(fresh.model)
    with torch.no_grad():
        for n, p in fresh.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    path = tmp_path / "merged.pt"
    torch.save({"state_dict": lora.checkpoint_weights(fresh.model)}, path)
    lora.end_phase(fresh.model)
    code = ("import sys, torch, open_clip, geomlab.models; m = open_clip.create_model('geomlab-tiny'); "
            f"m.load_state_dict(torch.load({str(path)!r}, weights_only=True)['state_dict']); "
            "assert 'peft' not in sys.modules, 'peft imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


# --- nsp -----------------------------------------------------------------------------------------


def earlier_inputs(model, fresh, strategy):
    """{layer: its input rows} over the covariance batches, recorded by forward hooks; out_proj's
    recomputed input checked against the attention's own output."""
    layers, inputs, outs = projected_layers(model), {}, {}
    hooks = record_inputs(model, layers, lambda n, x: inputs.setdefault(n, []).append(x.double()))
    hooks += [m.register_forward_hook(lambda m, a, out, n=n: outs.setdefault(n, []).append(out[0]))
              for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    data, context = fresh.stream.phases[0].train, strategy.context
    model.eval()
    with torch.no_grad():
        for b in range(strategy.batches):
            model(*context.load_batch(data, context.order(len(data), context.batch_size, b, COVARIANCE_ORDER)))
    model.train()
    for h in hooks:
        h.remove()
    for name, (m, _, _, kind) in layers.items():
        if kind == "out_proj":
            for x, y in zip(inputs[name], outs[name.removesuffix(".out_proj")]):
                torch.testing.assert_close(F.linear(x.float(), m.out_proj.weight, m.out_proj.bias).reshape(y.shape),
                                           y, rtol=1e-4, atol=1e-5)
    return {n: torch.cat(x) for n, x in inputs.items()}


def augmented(x, bias):
    return x if bias is None else torch.cat([x, x.new_ones(len(x), 1)], dim=1)


def test_nsp_projector_is_the_numpy_null_space_of_the_earlier_inputs(fresh, monkeypatch):
    monkeypatch.setitem(fresh.config["nsp"], "threshold", 0.01)
    nsp = fresh.make_strategy("nsp", "nsp", 1)
    inputs = earlier_inputs(fresh.model, fresh, nsp)
    nsp.start_phase(fresh.model)
    saved = fresh.run.load_strategy_state("nsp", 1)
    for layer in nsp.layers:
        x = augmented(inputs[layer.name], layer.bias).numpy()
        cov = x.T @ x
        np.testing.assert_allclose(saved[f"cov.{layer.name}"].numpy(), cov, rtol=1e-6, atol=1e-6 * np.abs(cov).max())
        values, vectors = np.linalg.eigh(cov)
        null = vectors[:, values <= 0.01 * values[-1]]
        assert 0 < null.shape[1] < len(cov)
        np.testing.assert_allclose(layer.projector.numpy(), null @ null.T, atol=1e-5)


def test_nsp_threshold_one_is_finetune_and_a_small_one_keeps_the_earlier_inputs_outputs(fresh, monkeypatch):
    start = fresh.initial
    finetune, _ = train_steps(fresh, start, "finetune", steps=3)
    monkeypatch.setitem(fresh.config["nsp"], "threshold", 1.0)
    free, _ = train_steps(fresh, start, "nsp", steps=3)
    assert_same_weights(finetune, free)
    monkeypatch.setitem(fresh.config["nsp"], "threshold", 1e-3)
    fresh.model.load_state_dict(start)
    nsp = fresh.make_strategy("probe", "nsp", 1)
    inputs = earlier_inputs(fresh.model, fresh, nsp)
    projected, _ = train_steps(fresh, start, "nsp", steps=3)
    model = copy.deepcopy(fresh.model)
    ratios = {}
    for name, (_, weight, bias, _) in projected_layers(model).items():
        x = augmented(inputs[name], bias)
        moves = []
        for weights in (finetune[-1], projected[-1]):
            ends = []
            for state in (weights, start):
                model.load_state_dict(state)
                _, w, b, _ = projected_layers(model)[name]
                ends.append(w.detach().clone() if b is None else torch.cat([w, b[:, None]], 1).detach())
            delta = ends[0] - ends[1]
            moves.append(float((x @ delta.double().T).norm()))
        ratios[name] = moves[1] / moves[0]
    assert max(ratios.values()) < 0.05, ratios


# --- end to end ----------------------------------------------------------------------------------

RUN = ["--strategies", "lora,cclip,nsp", "data.probe_size=4", "data.calibration_size=4", "data.shapes.domains=2",
       "data.shapes.train_size=32", "train.batch_size=16", "train.base_steps=2", "train.steps=6",
       "train.checkpoint_every=2", "train.log_every=2", "nsp.batches=1"]


def test_lora_cclip_nsp_resume_after_sigkill_mid_phase_match_an_uninterrupted_run(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = run_cli("--out", str(whole), *RUN)
    assert done.returncode == 0, done.stderr[-2000:]
    for strategy in ("cclip", "nsp"):  # (lora: cclip's adapters without the projector; one kill fewer)
        kill_inside(cut, strategy, RUN)
        saved = load_checkpoint(cut / strategy / "state.pt")["model"]
        assert strategy == "nsp" or any(".lora_A." in k for k in saved)  # the adapters are in the state
    resumed = run_cli("--out", str(cut), "--resume", *RUN)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for strategy in ("lora", "cclip", "nsp"):
        a, b = (load_checkpoint(d / strategy / "checkpoints" / "phase1_step000006.pt")["state_dict"]
                for d in (whole, cut))
        mid = load_checkpoint(cut / strategy / "checkpoints" / "phase1_step000002.pt")["state_dict"]
        assert set(a) == set(mid) == set(load_checkpoint(whole / "base" / "checkpoints" / "phase0_step000002.pt")
                                         ["state_dict"])  # open_clip's keys, mid-phase too
        worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        assert worst <= 1e-6, (strategy, worst)
    # and a phase draws its dropout masks from its own seed, whatever trained before it in the process
    # and however often it embeds its probes: cclip alone, checkpointed at phase ends only, equals
    # cclip after lora (whose dropout drew from the global generator) with mid-phase checkpoints
    # (whose DataLoaders draw nothing from it either), to the bit
    alone = tmp_path / "alone"
    done = run_cli("--out", str(alone), *[("cclip" if a == "lora,cclip,nsp" else a) for a in RUN],
                   "train.checkpoint_every=0")
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = (load_checkpoint(d / "cclip" / "checkpoints" / "phase1_step000006.pt")["state_dict"] for d in (whole, alone))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_torchrun_two_ranks_follows_the_single_process_run_for_lora_cclip_nsp(tmp_path):
    args = ["--strategies", "lora,cclip,nsp", "data.probe_size=4", "data.calibration_size=4", "data.shapes.domains=2",
            "data.shapes.train_size=32", "train.batch_size=16", "train.base_steps=2", "train.steps=3",
            "nsp.batches=1", "lora.dropout=0.0", "cclip.dropout=0.0", "nsp.threshold=0.05"]
    one, two = one_process_and_torchrun(tmp_path, args)
    assert json.loads((two / "run.json").read_text())["world_size"] == 2
    for name in ("phase1.safetensors",):  # the covariance summed over the ranks' shares
        from safetensors.torch import load_file
        a, b = load_file(one / "nsp" / "strategy_state" / name), load_file(two / "nsp" / "strategy_state" / name)
        for k in a:
            # (the two base phases agree to float noise only, and so do the inputs they give)
            torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=1e-5 * float(a[k].abs().max()))
    base = load_checkpoint(one / "base" / "checkpoints" / "phase0_step000002.pt")["state_dict"]
    for strategy in ("lora", "cclip", "nsp"):
        a, b = (load_checkpoint(d / strategy / "checkpoints" / "phase1_step000003.pt")["state_dict"] for d in (one, two))
        keys = [k for k in a if not k.endswith("in_proj_bias")]  # (a zero true gradient: see test_train)
        moved = max((a[k] - base[k]).abs().max().item() for k in keys)
        apart = torch.cat([(a[k] - b[k]).abs().flatten() for k in keys])
        share = (apart > 1e-5).double().mean().item()
        assert moved > 1e-4 and share < 1e-3 and apart.max() < 1e-3, (strategy, share, apart.max().item(), moved)


@pytest.mark.parametrize("args, names", [
    (["--strategies", "lora", "lora.rank=0"], "lora.rank"),
    (["--strategies", "cclip", "cclip.merge=0"], "cclip.merge"),
    (["--strategies", "cclip", "cclip.temperature=0"], "cclip.temperature"),
    (["--strategies", "nsp", "nsp.threshold=0"], "nsp.threshold"),
    (["--strategies", "nsp", "nsp.threshold=1.5"], "nsp.threshold"),
    (["--strategies", "lora", "lora.dropout=1.0"], "lora.dropout"),
])
def test_bad_lora_cclip_nsp_options_are_one_line_exit_2(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists()
