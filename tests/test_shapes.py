"""ShapeWorld stream: determinism, splits, vocabularies, captions, pixels, stream structure, preview."""
import numpy as np
import pytest
import torch

from geomlab.data import ProbeSet, Stream, build_stream
from geomlab.data import shapes as S


def test_deterministic_and_order_independent():
    a, ca = S.render(1, "train", np.arange(50), 32, seed=3)
    b, cb = S.render(1, "train", np.arange(50), 32, seed=3)
    assert a.dtype == np.uint8 and a.shape == (50, 32, 32, 3)
    assert np.array_equal(a, b) and ca == cb
    # a different seed gives different samples
    c, cc = S.render(1, "train", np.arange(50), 32, seed=4)
    assert not np.array_equal(a, c) and cc != ca
    # order / count independence, across permutation blocks (864 combinations per block)
    idx = np.array([49, 3, 0, 2000, 17, 900])
    big, cbig = S.render(1, "train", np.arange(2001), 32, seed=3)
    sub, csub = S.render(1, "train", idx, 32, seed=3)
    assert np.array_equal(sub, big[idx]) and csub == [cbig[i] for i in idx]
    one, c1 = S.render(1, "train", [17], 32, seed=3)
    assert np.array_equal(one[0], big[17]) and c1 == [cbig[17]]
    # the object window is an optimisation only
    at = S.attributes(2, "probe", np.arange(300), seed=0)
    assert np.array_equal(S._render_attrs(2, at, 32), S._render_attrs(2, at, 32, window=False))


def test_splits_disjoint_and_ids_unique():
    ids = []
    for d in range(len(S.DOMAINS)):
        for split in ("train", "probe", "novel"):
            ids.append(S.sample_ids(d, split, np.arange(1000)))
    ids = np.concatenate(ids)
    assert ids.dtype == np.int64 and len(np.unique(ids)) == len(ids)
    # train and probe of the same domain render different samples
    tr, ctr = S.render(0, "train", np.arange(100), 32, seed=0)
    pr, cpr = S.render(0, "probe", np.arange(100), 32, seed=0)
    assert not np.array_equal(tr, pr) and ctr != cpr


def test_domains_differ():
    assert len(S.DOMAINS) >= 5
    names = [d.name for d in S.DOMAINS]
    assert len(set(names)) == len(names)
    shapes = [set(d.shape_names) for d in S.DOMAINS]
    colours = [set(d.colour_names) for d in S.DOMAINS]
    bgs = [set(d.background_names) for d in S.DOMAINS]
    for i in range(len(S.DOMAINS)):
        assert len(shapes[i]) == 4 and len(colours[i]) == 4 and len(bgs[i]) == 3
        for j in range(i):
            assert not shapes[i] & shapes[j] and not colours[i] & colours[j] and not bgs[i] & bgs[j]
    # caption wording: the fixed words of each template (placeholders removed) differ pairwise
    import re
    fixed = [frozenset(re.sub(r"\{\w+\}", " ", d.template).replace(",", " ").split()) for d in S.DOMAINS]
    assert len(set(fixed)) == len(fixed)
    caps = [S.render(d, "probe", np.arange(5), 16)[1][0] for d in range(len(S.DOMAINS))]
    assert len({c.split()[0] for c in caps}) >= 3, caps


@pytest.mark.parametrize("domain", range(5))
def test_captions_identify_images(domain):
    d = S.DOMAINS[domain]
    assert d.n_combinations == 864
    at = S.attributes(domain, "probe", np.arange(200), seed=0)
    caps = S.captions_for(domain, at)
    assert len(set(caps)) / len(caps) >= 0.9
    # each caption names its attributes
    for k in range(0, 200, 37):
        c = caps[k]
        assert d.shape_names[at["shape"][k]] in c and d.colour_names[at["colour"][k]] in c
        assert S.SIZES[at["size"][k]] in c and S.POSITIONS[at["pos"][k]] in c
        assert d.background_names[at["bg"][k]] in c
    # attributes are spread over all values
    at = S.attributes(domain, "train", np.arange(4000), seed=1)
    for key, n in (("shape", 4), ("colour", 4), ("size", 2), ("pos", 9), ("bg", 3)):
        counts = np.bincount(at[key], minlength=n)
        assert len(counts) == n and counts.min() > 0.8 * 4000 / n


@pytest.mark.parametrize("domain", range(5))
def test_images_show_the_object(domain):
    d = S.DOMAINS[domain]
    at = S.attributes(domain, "train", np.arange(400), seed=0)
    imgs = S._render_attrs(domain, at, 32).astype(np.float32)
    # the object's colour is present: the pixel closest to the named colour is close to it
    colours = np.asarray([c for _, c in d.colours], np.float32)
    target = np.clip(colours[at["colour"]][:, None, None, :] * at["bright"][:, None, None, None], 0, 255)
    dist = np.abs(imgs - target).max(-1).reshape(len(imgs), -1).min(1)
    assert np.percentile(dist, 95) < 12, dist.max()
    # large objects cover more pixels than small ones
    near = (np.abs(imgs - target).max(-1) < 20).reshape(len(imgs), -1).sum(1)
    small, large = near[at["size"] == 0].mean(), near[at["size"] == 1].mean()
    assert large > 1.5 * small > 0
    # the object sits in its named cell: the centroid of its pixels is in the right third
    mask = (np.abs(imgs - target).max(-1) < 20)
    ys, xs = np.mgrid[:32, :32]
    w = mask.sum((1, 2))
    cx = (mask * xs).sum((1, 2)) / np.maximum(w, 1)
    cy = (mask * ys).sum((1, 2)) / np.maximum(w, 1)
    ok = (w > 0) & ((cx // (32 / 3)) == at["pos"] % 3) & ((cy // (32 / 3)) == at["pos"] // 3)
    assert ok.mean() > 0.9


@pytest.mark.parametrize("size", [16, 32, 64, 33])
def test_sizes(size):
    imgs, caps = S.render(4, "probe", np.arange(8), size, seed=0)
    assert imgs.shape == (8, size, size, 3) and len(caps) == 8
    assert imgs.std() > 5


def test_build_stream_structure():
    st = build_stream("shapes", {"probe_size": 50, "calibration_size": 20, "shapes": {"domains": 5, "train_size": 64}},
                      image_size=32, preprocess=None, seed=0)
    assert isinstance(st, Stream) and len(st.phases) == 5 and len(st.probes) == 15
    # per domain in stream order its seen probe set, then its novel one; both measure phase d; then
    # every domain's calibration set, measuring phase d too
    seen, novel, calibration = st.probes[0:10:2], st.probes[1:10:2], st.probes[10:]
    assert [p.name for p in calibration] == [f"{d.name}/calibration" for d in S.DOMAINS]
    assert [p.kind for p in calibration] == ["calibration"] * 5 and [len(p.ids) for p in calibration] == [20] * 5
    assert [p.phases for p in calibration] == [(d,) for d in range(5)] and st.info["calibration_size"] == 20
    assert [p.name for p in st.phases] == [p.name for p in seen] == [d.name for d in S.DOMAINS]
    assert [p.name for p in novel] == [f"{d.name}/novel" for d in S.DOMAINS]
    assert [p.kind for p in seen] == ["seen"] * 5 and [p.kind for p in novel] == ["novel"] * 5
    assert [p.phases for p in seen] == [p.phases for p in novel] == [(d,) for d in range(5)]
    assert [z.probe for z in st.zeroshot] == [p.name for p in seen for _ in range(2)]  # seen probes only
    assert st.info["stream"] == "shapes" and st.info["train_size"] == 64
    assert st.info["version"] == S.VERSION == 2 and st.info["novel_share"] == 0.25 and st.info["held_out"] == 216
    all_ids = []
    for d, (ph, pr, nv) in enumerate(zip(st.phases, seen, novel)):
        assert len(nv.ids) == 50 and nv.ids[0].item() == d * 10 ** 9 + 3 * 10 ** 8
        all_ids += nv.ids.tolist()
        assert len(ph.train) == 64
        img, cap, sid = ph.train[5]
        assert img.shape == (3, 32, 32) and img.dtype == torch.float32 and isinstance(cap, str)
        assert isinstance(sid, int) and sid == d * 10 ** 9 + 5
        assert isinstance(pr, ProbeSet) and pr.one_caption_per_image and len(pr.images) == 50
        assert pr.ids.dtype == torch.int64 and pr.ids[0].item() == d * 10 ** 9 + 10 ** 8
        assert pr.images[3].shape == (3, 32, 32)
        # normalised like open_clip: pixel p -> (p/255 - mean)/std
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        raw, _ = S.render(d, "probe", [3], 32, seed=0)
        expect = (torch.from_numpy(raw[0]).permute(2, 0, 1).float() / 255
                  - torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)
        assert torch.allclose(pr.images[3], expect, atol=1e-5)
        all_ids += ph.train.ids.tolist() + pr.ids.tolist()
    assert len(set(all_ids)) == len(all_ids)
    # a DataLoader batches it (uses __getitems__)
    loader = torch.utils.data.DataLoader(st.phases[0].train, batch_size=16, shuffle=False)
    x, caps, ids = next(iter(loader))
    assert x.shape == (16, 3, 32, 32) and len(caps) == 16 and ids.dtype == torch.int64
    assert torch.equal(x[5], st.phases[0].train[5][0]) and ids.tolist() == list(range(16))
    xb, cb, ib = st.phases[0].train.batch(range(16))
    assert torch.equal(xb, x) and cb == list(caps) and torch.equal(ib, ids)
    # probe_sets() gives the same probes as the stream
    ps = S.probe_sets(seed=0, image_size=32, probe_size=50, domains=5, calibration_size=20)
    assert [p.captions for p in ps] == [p.captions for p in st.probes]
    assert torch.equal(ps[2].images[7], st.probes[2].images[7])


def test_build_stream_defaults_and_errors():
    st = build_stream("shapes", {"shapes": {"domains": 2, "train_size": 8}}, image_size=16, preprocess=None, seed=0)
    assert len(st.phases) == 2 and len(st.probes[0].ids) == 200
    assert [(p.name, len(p.ids)) for p in st.probes[4:]] == [("d0_basic/calibration", 512),
                                                             ("d1_neon/calibration", 512)]
    with pytest.raises(ValueError):
        build_stream("shapes", {"shapes": {"domains": 0}}, image_size=16, preprocess=None, seed=0)
    with pytest.raises(ValueError):
        build_stream("shapes", {"shapes": {"domians": 2}}, image_size=16, preprocess=None, seed=0)
    with pytest.raises(ValueError):
        S.render(0, "test", [0], 32)
    # a probe larger than the 216 held-out combinations would repeat novel captions: refused
    with pytest.raises(ValueError, match="217 exceeds the 216 held-out"):
        build_stream("shapes", {"probe_size": 217, "shapes": {"domains": 1, "train_size": 8}}, image_size=16,
                     preprocess=None, seed=0)
    for share in (-0.1, 1.0, True):
        with pytest.raises(ValueError, match="novel_share"):
            build_stream("shapes", {"shapes": {"domains": 1, "train_size": 8, "novel_share": share}}, image_size=16,
                         preprocess=None, seed=0)
    with pytest.raises(ValueError, match="exceeds the 216 combinations per domain left for training"):
        S.probe_sets(probe_size=217, domains=1, novel_share=0.75)


def _combos(domain, split, n, seed=0, share=S.NOVEL_SHARE):
    at = S.attributes(domain, split, np.arange(n), seed, share)
    return set(zip(*(at[k].tolist() for k in ("shape", "colour", "size", "pos", "bg"))))


@pytest.mark.parametrize("domain", range(5))
def test_novel_probe_combinations_never_trained_on(domain):
    """The novel probe's attribute combinations (so its captions) occur in no train split nor in
    the seen probe of its domain; every attribute value still occurs in training."""
    d = S.DOMAINS[domain]
    held = S.held_out(domain, seed=0)
    assert len(held) == S.n_held_out() == 216 and len(np.unique(held)) == 216
    novel = _combos(domain, "novel", 200)
    train, probe = _combos(domain, "train", 4000), _combos(domain, "probe", 200)
    assert len(novel) == 200 and len(probe) == 200       # no caption repeats within a probe set
    assert not novel & train and not novel & probe
    assert len(train) == 864 - 216                        # 4000 pairs cover every seen combination
    assert novel <= set(map(tuple, np.stack(list(S._attribute_values(d, held).values()), 1).tolist()))
    caps = S.captions_for(domain, S.attributes(domain, "train", np.arange(4000), 0))
    ncaps = S.captions_for(domain, S.attributes(domain, "novel", np.arange(200), 0))
    assert not set(ncaps) & set(caps)
    # every attribute value occurs in training, and about as often as before (quota per value)
    at = S.attributes(domain, "train", np.arange(4000), seed=0)
    for key, n in (("shape", 4), ("colour", 4), ("size", 2), ("pos", 9), ("bg", 3)):
        counts = np.bincount(at[key], minlength=n)
        assert len(counts) == n and counts.min() > 0.9 * 4000 / n, (key, counts)


def test_held_out_is_a_function_of_seed_and_domain():
    a = S.held_out(2, seed=5)
    assert np.array_equal(a, S.held_out(2, seed=5)) and not np.array_equal(a, S.held_out(2, seed=6))
    assert not np.array_equal(a, S.held_out(3, seed=5))
    # the pools partition the combinations; the seen ones are shared by train, probe and reference
    pool = S.combination_pool(2, "train", seed=5)
    assert np.array_equal(pool, S.combination_pool(2, "probe", seed=5))
    assert np.array_equal(pool, S.combination_pool(2, "reference", seed=5))
    assert np.array_equal(np.sort(np.concatenate([pool, a])), np.arange(864))
    assert np.array_equal(S.combination_pool(2, "novel", seed=5), a)
    # sampling stays deterministic and order independent per (seed, domain, split, index)
    big, cbig = S.render(2, "novel", np.arange(300), 16, seed=5)
    idx = np.array([299, 3, 216, 0])
    sub, csub = S.render(2, "novel", idx, 16, seed=5)
    assert np.array_equal(sub, big[idx]) and csub == [cbig[i] for i in idx]
    # even a large share keeps every attribute value in training
    for share in (0.5, 0.9, 0.98):
        rest = S._attribute_values(S.DOMAINS[0], S.combination_pool(0, "train", 0, share))
        assert len(rest["shape"]) == 864 - S.n_held_out(share)
        assert all(len(np.unique(v)) == n for v, n in zip(rest.values(), (4, 4, 2, 9, 3)))
    # novel_share 0: nothing held out, no novel probes, the data of VERSION 1
    st = build_stream("shapes", {"probe_size": 20, "calibration_size": 0,
                                 "shapes": {"domains": 2, "train_size": 8, "novel_share": 0}},
                      image_size=16, preprocess=None, seed=0)
    assert [p.name for p in st.probes] == ["d0_basic", "d1_neon"] and len(S.held_out(0, 0, 0.0)) == 0


def test_preview_cli(tmp_path, capsys):
    out = tmp_path / "sub" / "preview.html"
    assert S.main(["--preview", str(out), "--image-size", "32", "--per-domain", "3", "--seed", "1"]) == 0
    assert str(out) in capsys.readouterr().out
    text = out.read_text()
    assert "plotly" in text.lower() and len(text) > 100_000   # plotly.js embedded
    flat = text.replace("\\u003cbr\\u003e", " ").replace("<br>", " ")
    for d in range(len(S.DOMAINS)):
        assert S.DOMAINS[d].name in text
        for cap in S.render(d, "train", np.arange(3), 32, seed=1)[1]:
            assert cap in flat, cap


def test_calibration_split_is_distinct_and_changes_nothing_else():
    """The calibration split (split id 4) renders samples of the seen combinations that are none of the
    probe's or the train split's, and adding it left every other split's samples as they were."""
    for d in (0, 3):
        cal, ccal = S.render(d, "calibration", np.arange(200), 16, seed=0)
        pool = set(S.combination_pool(d, "calibration").tolist())
        assert pool == set(S.combination_pool(d, "probe").tolist())  # drawn like the probe split
        assert len(set(ccal)) == 200  # within a block of the pool no caption repeats, as in the probe
        for split, n in (("probe", 200), ("train", 2000)):
            other, _ = S.render(d, split, np.arange(n), 16, seed=0)
            same = (cal.reshape(len(cal), 1, -1) == other.reshape(1, n, -1)).all(-1)
            assert not same.any(), f"domain {d}: a calibration image equals a {split} image"
    ids = np.concatenate([S.sample_ids(d, split, np.arange(1000)) for d in range(5) for split in S.SPLITS])
    assert len(np.unique(ids)) == len(ids) and S.sample_ids(2, "calibration", [5])[0] == 2 * 10 ** 9 + 4 * 10 ** 8 + 5

    # bit-identical to the samples rendered before the split existed (digests recorded with that code)
    import hashlib
    before = {("train", 0): "d2b2ccaa6fa43111", ("train", 4): "9bca1fd0ab8b3486", ("probe", 0): "42d7f6f7d8997961",
              ("probe", 4): "7dab14465b5b164d", ("novel", 0): "cd76a419725453b5", ("novel", 4): "50208f75c69ecc3d",
              ("reference", S.REFERENCE_ID): "8d922366de59ffee"}
    for (split, d), digest in before.items():
        imgs, caps = S.render(d, split, np.arange(40), 16, seed=7)
        assert hashlib.sha1(imgs.tobytes() + "\n".join(caps).encode()).hexdigest()[:16] == digest, (split, d)
    # and a stream with calibration sets holds the very phases and probe sets of one without
    cfg = {"probe_size": 30, "shapes": {"domains": 2, "train_size": 16, "reference_size": 8, "reference_texts": 4}}
    without = build_stream("shapes", {**cfg, "calibration_size": 0}, image_size=16, preprocess=None, seed=1)
    with_cal = build_stream("shapes", {**cfg, "calibration_size": 10}, image_size=16, preprocess=None, seed=1)
    assert [p.name for p in with_cal.probes] == [p.name for p in without.probes] + [
        "d0_basic/calibration", "d1_neon/calibration"]
    for a, b in zip(without.probes, with_cal.probes):
        assert torch.equal(a.images.base.pixels, b.images.base.pixels) and a.captions == b.captions
    for a, b in zip(without.phases, with_cal.phases):
        assert torch.equal(a.train.pixels, b.train.pixels) and a.train.captions == b.train.captions
    assert torch.equal(without.reference.pixels, with_cal.reference.pixels)
    assert without.reference_texts == with_cal.reference_texts
