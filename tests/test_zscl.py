"""ZSCL's distillation against an independent dense formula (value, gradient, the reference code's
λ = 8 form, ranks' shares), on the trainer (the base model's pool and image features, no gradient
into the text encoder), and its reference data: ShapeWorld's reference domain shares no attribute
combination, caption or id with any probe or training split; real reference sources sharing a
caption or an image with a probe are refused."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geomlab import train
from geomlab.config import resolve
from geomlab.data import DataError, build_stream
from geomlab.data import shapes as S
from geomlab.io import atomic_torch_save
from geomlab.kernels import reference
from geomlab.strategies import Features
from geomlab.strategies.zscl import distillation

SMALL = ["data.probe_size=8", "data.calibration_size=8", "data.shapes.domains=3", "data.shapes.train_size=32",
         "train.batch_size=16", "data.shapes.reference_size=40", "data.shapes.reference_texts=64",
         "zscl.reference_batch_size=8"]


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


def dense(u, v, pool, s, T):
    """½(KL_a + KL_b): KL(softmax(s·v·poolᵀ/T) ‖ softmax(s·u·poolᵀ/T)) over the pool, mean over the
    images; and over the images (columns), mean over the pool texts."""
    Z, Zb = s * u @ pool.T / T, s * v @ pool.T / T

    def kl(M, Mb):
        return F.kl_div(F.log_softmax(M, 1), F.log_softmax(Mb, 1), log_target=True, reduction="batchmean")

    return 0.5 * (kl(Z, Zb) + kl(Z.T, Zb.T))


def test_distillation_is_the_dense_formula_and_lambda_8_is_the_reference_codes_strength():
    R, P, D, s, T = 6, 40, 16, 30.0, 2.0
    v, pool = unit(R, D, 1), unit(P, D, 2)
    u0 = F.normalize(v + 0.5 * unit(R, D, 3), dim=1)
    got_u, want_u, ref_u = (u0.clone().requires_grad_() for _ in range(3))
    got, _, _ = distillation(got_u, v, pool, s, T)
    want = dense(want_u, v, pool, s, T)
    got.double().backward()
    want.backward()
    assert float(want.detach()) > 1e-3
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    torch.testing.assert_close(got_u.grad, want_u.grad, rtol=1e-4, atol=1e-7)
    # Thunderbeee/ZSCL mtil/src/models/helpers.py `distillation`: cross_entropy(s/T, softmax(t/T))·T²
    # on the logits and on their transpose, summed (finetune.py, --image_loss --text_loss): its
    # gradient is that of 2·T²·½(KL_a + KL_b) = 8·distill at T = 2.
    logits, logits_ref = s * ref_u @ pool.T, s * v @ pool.T

    def ce(x, t):
        return F.cross_entropy(x / T, F.softmax(t / T, dim=1)) * T ** 2

    (ce(logits, logits_ref) + ce(logits.T, logits_ref.T)).backward()
    torch.testing.assert_close(ref_u.grad, 8 * want_u.grad, rtol=1e-10, atol=1e-12)


def test_the_ranks_shares_add_up_to_the_whole():
    R, P, D, s, T = 6, 24, 8, 20.0, 2.0
    u, v, pool = unit(R, D, 4), unit(R, D, 5), unit(P, D, 6)
    whole = float(distillation(u, v, pool, s, T)[0])
    shares = [distillation(u[lo:hi], v[lo:hi], pool, s, T, u, v, world=2)[0] for lo, hi in ((0, 0), (0, 6))]
    assert float(sum(shares)) == pytest.approx(whole, rel=1e-6)
    shares = [distillation(u[lo:hi], v[lo:hi], pool, s, T, u, v, world=2)[0] for lo, hi in ((0, 2), (2, 6))]
    assert float(sum(shares)) == pytest.approx(whole, rel=1e-6)


# --- on the trainer --------------------------------------------------------------------------------


def zscl_at_phase_2(trainer):
    """ZSCL for phase 2, the base model = the initial weights, the model moved away from them."""
    trainer.model.load_state_dict(trainer.initial)
    atomic_torch_save(trainer.run.checkpoint_path("base", 0, 6), {"state_dict": trainer.initial, "phase": 0, "step": 6})
    with torch.no_grad():
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    zscl = trainer.make_strategy("zscl", "zscl", 2)
    return zscl, zscl.start_phase(trainer.model)


def test_zscl_distils_the_base_models_pool_distribution_on_reference_images(trainer):
    zscl, data = zscl_at_phase_2(trainer)
    base, stream = zscl.context.base_model, trainer.stream
    for key, value in base.state_dict().items():  # the base model (end of phase 0), not the phase start
        assert torch.equal(value, trainer.initial[key]), key
    assert zscl.weight == 8.0 and zscl.temperature == 2.0
    with torch.no_grad():  # the pool: the base model's embeddings of the stream's reference texts
        pool = F.normalize(base.encode_text(trainer.tokenizer(stream.reference_texts)), dim=-1)
    torch.testing.assert_close(zscl.pool, pool, rtol=1e-5, atol=1e-6)
    assert zscl.pool.shape[0] == 64
    current, probes = set(stream.phases[2].train.ids.tolist()), {int(i) for p in stream.probes for i in p.ids}
    for step in range(2):
        rows = zscl.step_indices(step)
        ids = [data[r][2] for r in rows]
        assert len(rows) == 16 + 8 and set(ids[:16]) <= current
        assert all(i // 10 ** 8 == S.REFERENCE_ID * 10 + S.REFERENCE for i in ids[16:])
        assert not set(ids[16:]) & (current | probes)
        images, tokens = trainer.load_batch(data, rows)
        image, text, scale = trainer.model(images, tokens)[:3]
        loss, parts = zscl.loss(images, tokens, Features(image, text, image, text, scale), step)
        with torch.no_grad():
            base_image = F.normalize(base.encode_image(images[16:]), dim=-1)
        s = float(base.logit_scale.exp())  # the base model's scale, as ZSCL's (never trained) one
        want = float(dense(image[16:].detach().double(), base_image.double(), pool.double(), s, 2.0))
        assert float(parts["distill"].detach()) == pytest.approx(want, rel=1e-4) and want > 1e-4
        clip = reference.clip_loss(image[:16].detach(), text[:16].detach(), scale.detach())
        assert float(parts["clip"].detach()) == pytest.approx(float(clip), rel=1e-5)
        assert float(loss.detach()) == pytest.approx(float(clip) + 8.0 * want, rel=1e-4)


def test_the_text_encoder_gets_no_gradient_from_the_distillation(trainer):
    zscl, data = zscl_at_phase_2(trainer)
    images, tokens = trainer.load_batch(data, zscl.step_indices(0))
    model = trainer.model
    model.zero_grad(set_to_none=True)
    image, text, scale = model(images, tokens)[:3]
    _, parts = zscl.loss(images, tokens, Features(image, text, image, text, scale), 0)
    parts["distill"].backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    visual = [n for n in grads if n.startswith("visual.")]
    assert visual and any(grads[n] is not None and grads[n].abs().max() > 0 for n in visual)
    quiet = [n for n in grads if not n.startswith("visual.")]  # text tower, token embedding, logit scale
    assert len(quiet) > 5 and all(grads[n] is None or not grads[n].any() for n in quiet), \
        [n for n in quiet if grads[n] is not None and grads[n].any()]


# --- reference data --------------------------------------------------------------------------------


def names(domain, attrs):
    d = S._domain(domain)
    """(shape, colour, size, position, background) names of each sample."""
    return set(zip((d.shapes[i][0] for i in attrs["shape"].tolist()),
                   (d.colours[i][0] for i in attrs["colour"].tolist()),
                   (S.SIZES[i] for i in attrs["size"].tolist()), (S.POSITIONS[i] for i in attrs["pos"].tolist()),
                   (d.backgrounds[i].name for i in attrs["bg"].tolist())))


def test_shapes_reference_shares_no_combination_caption_or_id_with_any_probe_or_training_split():
    stream = build_stream("shapes", resolve({"data": {"probe_size": 200}})["data"], image_size=8, preprocess=None,
                          seed=3)
    ref = stream.reference
    assert len(ref) == 1000 and len(stream.reference_texts) == 2000
    assert len(stream.probes) >= 5  # every probe split the stream builds (seen and, where held out, novel)
    ref_names = names(S.REFERENCE_ID, ref.attrs)
    pool_attrs = S.reference_attributes(np.arange(1000, 3000), 3)
    assert S.captions_for(S.REFERENCE_ID, pool_attrs) == stream.reference_texts
    held, held_names = set(), set()
    for split in [p.train for p in stream.phases] + [p.images.base for p in stream.probes]:
        held_names |= names(split.domain, split.attrs)
        held |= set(split.captions)
        assert not set(split.ids.tolist()) & set(ref.ids.tolist())
    # every combination of every domain: the reference's are none of them
    everything = set().union(*(names(d, S.attributes(d, "train", np.arange(864), 3, novel_share=0)) for d in range(5)))
    assert held_names <= everything and len(everything) == 5 * 864
    assert not ref_names & everything and not names(S.REFERENCE_ID, pool_attrs) & everything
    for p in stream.probes:
        held |= set(p.captions)
    assert not set(ref.captions) & held and not set(stream.reference_texts) & held
    assert not set(ref.captions) & set(stream.reference_texts)  # the pool is unpaired with the images
    assert len(set(ref.captions)) == 1000 and len(set(stream.reference_texts)) == 2000


def test_real_reference_sharing_a_caption_or_an_image_with_a_probe_is_refused(tmp_path):
    from test_strategies import write_csv
    train_src, probe_src = write_csv(tmp_path, "train.csv", [0, 1]), write_csv(tmp_path, "probe.csv", [3, 4])

    def stream(ref):
        sources = [train_src, {**probe_src, "role": "probe"}, {**ref, "role": "reference"}]
        data = resolve({"data": {"stream": "datasets", "root": str(tmp_path), "sources": sources,
                                 "calibration_size": 0}})["data"]
        return build_stream("datasets", data, image_size=32, preprocess=None, seed=0)

    good = stream(write_csv(tmp_path, "ref.csv", [5, 6, 7], "a reference picture {}"))
    assert good.reference_texts == [f"a reference picture {i}" for i in (5, 6, 7)]
    (tmp_path / "caption.csv").write_text("filepath,title\n5.png,a reference picture 5\n6.png,a picture number 4\n")
    with pytest.raises(DataError) as caught:
        stream({"name": "caption", "format": "csv", "path": "caption.csv"})
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and "'a picture number 4'" in line and "'caption'" in line and "'probe'" in line
    with pytest.raises(DataError) as caught:
        stream(write_csv(tmp_path, "image.csv", [4], "another caption {}"))
    line = str(caught.value)
    assert len(line.splitlines()) == 1 and "4.png: image is in both reference source 'image'" in line
