"""EWC's Fisher and DER's targets against independent computations on the tiny model: the Fisher
is the mean of the per-sample squared gradients (a plain per-sample loop), phases combine online
(γ·F_before + F_new); DER's similarity-row target ignores a rotation of both modalities and sees a
changed similarity (the embedding target sees the rotation), DER++ draws its own second batch;
bad options are refused in one line."""
import copy

import pytest
import torch
import torch.nn.functional as F

from geomlab import train
from geomlab.kernels import reference
from geomlab.strategies import Features
from geomlab.strategies.ewc import FISHER_ORDER, diagonal_fisher, per_sample_clip_losses

SMALL = ["data.probe_size=8", "data.calibration_size=8", "data.shapes.domains=3", "data.shapes.train_size=32",
         "train.batch_size=16", "data.shapes.reference_size=40"]


def unit(n, d, seed, dtype=torch.float64):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=1)


# --- EWC -----------------------------------------------------------------------------------------


def loop_fisher(model, context, data, batches):
    """Mean over samples of (∂l_i/∂θ)², one backward per sample: l_i = ½[CE(row i of s·I Tᵀ) +
    CE(row i of s·T Iᵀ)] written out with log-softmax, on the batches the Fisher reads."""
    params = dict(model.named_parameters())
    total, samples = {n: torch.zeros_like(p) for n, p in params.items()}, 0
    model.eval()
    for b in range(batches):
        images, tokens = context.load_batch(data, context.order(len(data), context.batch_size, b, FISHER_ORDER))
        image, text, s = model(images.double(), tokens)[:3]
        logits = s * image @ text.T
        losses = -0.5 * (logits.log_softmax(1).diagonal() + logits.T.log_softmax(1).diagonal())
        torch.testing.assert_close(losses.mean(), reference.clip_loss(image, text, s))
        for i in range(len(losses)):
            grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
            for n, g in zip(params, grads):
                if g is not None:
                    total[n] += g.square()
        samples += len(losses)
    return {n: v / samples for n, v in total.items()}


def test_ewc_fisher_is_the_mean_over_samples_of_each_samples_squared_gradient(fresh):
    model = copy.deepcopy(fresh.model).double().train()  # float64: the two computations agree to rounding
    context = fresh.make_strategy("ewc", "ewc", 1).context
    data = fresh.stream.phases[0].train
    got = diagonal_fisher(model, data, context, 2)
    assert model.training  # (computed in eval mode, the mode restored)
    want = loop_fisher(model, context, data, 2)
    assert set(got) == set(want) and sum(float(f.sum()) for f in want.values()) > 0
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6 * float(want[n].abs().max()))
    image, text = unit(5, 8, 1), unit(5, 8, 2)
    assert float(per_sample_clip_losses(image, text, 3.0).mean()) == pytest.approx(
        float(reference.clip_loss(image, text, 3.0)), rel=1e-12)


def test_ewc_phases_combine_online_and_the_penalty_is_the_sum_of_their_terms(fresh, monkeypatch):
    gamma, weight = 0.3, 2.0
    monkeypatch.setitem(fresh.config["ewc"], "fisher_batches", 1)
    monkeypatch.setitem(fresh.config["ewc"], "gamma", gamma)
    monkeypatch.setitem(fresh.config["ewc"], "weight", weight)
    model = fresh.model
    ewc1 = fresh.make_strategy("ewc", "ewc", 1)
    ewc1.start_phase(model)
    f1 = diagonal_fisher(model, fresh.stream.phases[0].train, ewc1.context, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    ewc2 = fresh.make_strategy("ewc", "ewc", 2)
    ewc2.start_phase(model)
    f2 = diagonal_fisher(model, fresh.stream.phases[1].train, ewc2.context, 1)
    saved = fresh.run.load_strategy_state("ewc", 2)
    for n, p in model.named_parameters():
        torch.testing.assert_close(saved[f"fisher.{n}"], gamma * f1[n] + f2[n], rtol=1e-5,
                                   atol=1e-7 * float(f2[n].abs().max()))
        assert torch.equal(saved[f"anchor.{n}"], p.detach())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    shift = {n: (p.detach() - saved[f"anchor.{n}"]).double() for n, p in model.named_parameters()}
    terms = [sum(float((f[n].double() * shift[n] ** 2).sum()) for n in shift) for f in (f1, f2)]
    assert terms[0] > 0 and terms[1] > 0
    assert float(ewc2.penalty().detach()) == pytest.approx(0.5 * weight * (gamma * terms[0] + terms[1]), rel=1e-4)


# --- DER -----------------------------------------------------------------------------------------


def der_batch(der, d=16, seed=5):
    """Features of step 3's whole batch (new, replayed, second draw, anchors), float64, and s."""
    rows = len(der.step_indices(3))
    return unit(rows, d, seed), unit(rows, d, seed + 1), torch.tensor(5.0, dtype=torch.float64)


def make_der(fresh, monkeypatch, **options):
    monkeypatch.setitem(fresh.config["der"], "buffer_size", 24)
    monkeypatch.setitem(fresh.config["der"], "alpha", 0.7)
    for key, value in options.items():
        monkeypatch.setitem(fresh.config["der"], key, value)
    der = fresh.make_strategy("der", "der", 1)
    der.start_phase(fresh.model)
    return der


def test_der_stores_similarity_rows_against_fixed_anchors(fresh, monkeypatch):
    der = make_der(fresh, monkeypatch, anchor_size=5)
    first = fresh.run.load_strategy_state("der", 1)
    assert first["image_row"].shape == (24, 5) and len(first["anchor_phase"]) == 5
    model = fresh.model.eval()
    samples, anchors = (list(zip(first[p].tolist(), first[i].tolist()))
                        for p, i in (("phase", "index"), ("anchor_phase", "anchor_index")))
    with torch.no_grad():
        image, text = encode(fresh, samples)
        anchor_image, anchor_text = encode(fresh, anchors)
        s = model.logit_scale.exp()
    model.train()
    torch.testing.assert_close(first["image_row"], s * image @ anchor_text.T, rtol=0, atol=1e-4)
    torch.testing.assert_close(first["text_row"], s * text @ anchor_image.T, rtol=0, atol=1e-4)
    # phase 2: the anchors stay, the slots still holding phase-0 samples keep their rows
    with torch.no_grad():
        for p in fresh.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    fresh.make_strategy("der", "der", 2).start_phase(fresh.model)
    second = fresh.run.load_strategy_state("der", 2)
    assert torch.equal(second["anchor_phase"], first["anchor_phase"])
    assert torch.equal(second["anchor_index"], first["anchor_index"])
    kept = [j for j in range(24) if (int(second["phase"][j]), int(second["index"][j])) == samples[j]]
    assert kept and len(kept) < 24
    assert torch.equal(second["image_row"][kept], first["image_row"][kept])
    assert der.n_anchors == 5 and der.step_indices(0)[-5:] == [len(der.context.data) + 24 + a for a in range(5)]


def encode(trainer, samples):
    images, captions = zip(*[trainer.stream.phases[p].train[i][:2] for p, i in samples])
    image = F.normalize(trainer.model.encode_image(torch.stack(images)), dim=-1)
    text = F.normalize(trainer.model.encode_text(trainer.tokenizer(list(captions))), dim=-1)
    return image, text


def test_der_logit_target_ignores_a_shared_rotation_and_sees_a_changed_similarity(fresh, monkeypatch):
    der = make_der(fresh, monkeypatch, anchor_size=4)
    B, k, A = 16, der.n_replay, der.n_anchors
    assert (k, A) == (4, 4)
    image, text, s = der_batch(der)
    der.stored = unit(24, 4, 9) * 3, unit(24, 4, 10) * 3  # stored rows, float64
    slots = der.replayed_slots(3)
    loss, parts = der.loss(None, None, Features(image, text, image, text, s), 3)
    rows = torch.cat([s * image[B - k:B] @ text[B:].T, s * text[B - k:B] @ image[B:].T], 1)
    mse = F.mse_loss(rows, torch.cat([der.stored[0][slots], der.stored[1][slots]], 1))  # reduction "mean"
    assert float(parts["der_mse"]) == pytest.approx(float(mse), rel=1e-12)
    want = reference.clip_loss(image[:B - k], text[:B - k], s) + 0.7 * mse
    assert float(loss) == pytest.approx(float(want), rel=1e-12)
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    rotated, _ = der.loss(None, None, Features(image @ q, text @ q, image @ q, text @ q, s), 3)
    assert float(rotated) == pytest.approx(float(loss), rel=1e-5)
    moved = image.clone()
    moved[B - 1] = unit(1, 16, 11)[0]  # one replayed image: its similarities to the anchor texts change
    changed, _ = der.loss(None, None, Features(moved, text, moved, text, s), 3)
    assert abs(float(changed) - float(loss)) > 1e-3
    # two ranks of 10 and 10 rows (the second holds replayed rows and the anchors): the shares add up
    shares = [der.loss(None, None, Features(image[lo:hi], text[lo:hi], image, text, s, row_offset=lo), 3)[0]
              for lo, hi in ((0, 10), (10, 20))]
    assert float(sum(shares)) == pytest.approx(float(loss), rel=1e-10)


def test_der_embedding_target_is_the_old_distance_and_sees_the_rotation(fresh, monkeypatch):
    der = make_der(fresh, monkeypatch, target="embedding")
    B, k = 16, der.n_replay
    image, text, s = der_batch(der)
    assert len(image) == B  # no anchors ride along
    der.stored = unit(24, 16, 7), unit(24, 16, 8)
    slots = der.replayed_slots(3)
    loss, parts = der.loss(None, None, Features(image, text, image, text, s), 3)
    distance = 0.5 * (((image[B - k:] - der.stored[0][slots]) ** 2).sum(1).mean()
                      + ((text[B - k:] - der.stored[1][slots]) ** 2).sum(1).mean())
    assert float(parts["der_mse"]) == pytest.approx(float(distance), rel=1e-10)
    q = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64))[0]
    rotated, _ = der.loss(None, None, Features(image @ q, text @ q, image @ q, text @ q, s), 3)
    assert abs(float(rotated) - float(loss)) > 1e-3


def test_derpp_draws_a_second_batch_of_its_own_for_the_clip_term(fresh, monkeypatch):
    der = make_der(fresh, monkeypatch, beta=0.4, anchor_size=4)
    B, k, n = 16, der.n_replay, len(der.context.data)
    rows = der.step_indices(3)
    assert len(rows) == B + k + 4
    first, second = rows[B - k:B], rows[B:B + k]
    assert all(n <= r < n + 24 for r in first + second) and first != second
    assert der.n_second == k and [r - n for r in first] == der.replayed_slots(3)
    image, text, s = der_batch(der)
    der.stored = unit(24, 4, 9), unit(24, 4, 10)
    loss, parts = der.loss(None, None, Features(image, text, image, text, s), 3)
    clip_second = reference.clip_loss(image[B:B + k], text[B:B + k], s)
    assert float(parts["clip_replay"]) == pytest.approx(float(clip_second), rel=1e-10)
    assert float(loss) == pytest.approx(float(parts["clip"] + 0.7 * parts["der_mse"] + 0.4 * clip_second), rel=1e-12)
    # the second draw follows an order of its own: over steps, it is not the first draw shifted
    assert any(der.step_indices(t)[B - k:B] != der.step_indices(t)[B:B + k] for t in range(8))


# --- bad options ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args, names", [
    (["ewc.gamma=-0.1"], "ewc.gamma"),
    (["der.anchor_size=0"], "der.anchor_size"),
    (["der.target=features"], "der.target"),
])
def test_bad_ewc_and_der_options_are_one_line_exit_2(tmp_path, capsys, args, names):
    out = tmp_path / "run"
    assert train.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and names in err, err
    assert not out.exists()
