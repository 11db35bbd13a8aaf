"""Per-batch reading (cxrsynth.data.arrays, cxrsynth.models.text_states): the same rows, batches, hashes and trained
weights as the in-memory path it replaced, and each DDP rank reads only its own rows."""
import hashlib

import numpy as np
import pytest
import torch
from toys import labeled_squares, save_tiny_bert

from cxrsynth.config import ClassifierParams
from cxrsynth.data import arrays
from cxrsynth.data.arrays import Concat, NpyRows, stream_sha256
from cxrsynth.eval.features import Resized, mean_std
from cxrsynth.images import resize, to_image_tensor


@pytest.fixture()
def images(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, size=(37, 12, 10), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    return a, NpyRows(tmp_path / "a.npy")


def test_npy_rows_read_what_np_load_reads(images):
    a, rows = images
    assert len(rows) == 37 and rows.shape == a.shape and rows.dtype == a.dtype
    assert np.array_equal(rows[5], a[5]) and np.array_equal(rows[-1], a[-1])
    assert np.array_equal(rows[3:20], a[3:20]) and np.array_equal(rows[30:99], a[30:])
    assert np.array_equal(rows[::4], a[::4]) and rows[10:10].shape == (0, 12, 10)
    idx = np.array([36, 0, 5, 6, 7, 5, -2])  # unsorted, repeated, negative, runs
    assert np.array_equal(rows[idx], a[idx])
    mask = np.arange(37) % 3 == 0
    assert np.array_equal(rows[mask], a[mask])
    assert np.array_equal(np.asarray(rows), a)
    with pytest.raises(IndexError):
        rows[37]
    with pytest.raises(IndexError):
        rows[np.array([0, 40])]
    rows[idx][0, 0, 0] = 0  # a fresh array each time: the file is untouched
    assert np.array_equal(rows[36], a[36])


def test_npy_rows_refuse_a_truncated_file(tmp_path):
    np.save(tmp_path / "t.npy", np.zeros((10, 4, 4), np.uint8))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-20])
    with pytest.raises(ValueError, match="truncated"):
        NpyRows(tmp_path / "t.npy")


def test_resized_and_concat_equal_the_in_memory_results(images):
    a, rows = images
    small = Resized(rows, 6)
    whole = resize(to_image_tensor(a), 6)[:, 0].clamp(0, 1).numpy()
    idx = np.array([3, 1, 30, 2])
    assert np.array_equal(small[idx], whole[idx]) and np.array_equal(small[4], whole[4])
    assert np.array_equal(small[0:37], whole)
    b = np.random.default_rng(1).random((5, 6, 6)).astype(np.float32)
    both = Concat(small, b)
    ref = np.concatenate([whole, b])
    pick = np.array([40, 0, 36, 37, 41, 2, 38])
    assert len(both) == 42 and np.array_equal(both[pick], ref[pick]) and np.array_equal(both[-1], ref[-1])
    assert np.array_equal(both[30:42], ref[30:42])


def test_stream_hash_and_statistics_equal_whole_array_values(images, monkeypatch):
    a, rows = images
    monkeypatch.setattr(arrays, "CHUNK_BYTES", 500)  # many chunks, an uneven last one
    assert arrays.chunk_rows(rows, 500) == 4
    assert stream_sha256(rows) == hashlib.sha256(a.tobytes()).hexdigest()
    mean, std = mean_std(rows, 8, batch=5)
    x = resize(to_image_tensor(a), 8).double()
    assert mean == pytest.approx(float(x.mean()), abs=1e-12) and std == pytest.approx(float(x.std()), abs=1e-12)


def test_codebook_batches_and_weights_match_the_in_memory_path(tmp_path):
    from test_vqgan import blobs, tiny_params

    from cxrsynth.models.vqgan import to_model_input, training_setup
    from cxrsynth.train import EpochSampler, train

    imgs = (blobs(24, 20) * 255).astype(np.uint8)
    np.save(tmp_path / "train.npy", imgs)
    p = tiny_params(steps=6, disc_start=3)
    x_all = to_model_input(imgs, p.image_size)  # what the old code held: every image, resized once
    sampler = EpochSampler(len(imgs), p.batch_size, 3)
    runs = []
    for source in (NpyRows(tmp_path / "train.npy"), imgs):  # set up and train one after the other (seeded)
        s = training_setup(p, source, imgs[:4], seed=3, device="cpu", progress=False)
        for step in (0, 5, 11):
            assert torch.equal(s.batches(step)["x"], x_all[torch.from_numpy(sampler(step))])
        train(s.trainer, s.loss_fn, s.batches, s.cfg, None)
        runs.append(s)
    on_disk, in_ram = runs
    assert on_disk.cfg.run_id == in_ram.cfg.run_id  # the fingerprint: streamed hash = hash of the bytes
    a, b = on_disk.trainer.state_dict(), in_ram.trainer.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_classifier_batches_and_weights_match_the_in_memory_path(tmp_path):
    from cxrsynth.models.classifier import fit
    from cxrsynth.data.arrays import LabeledImages

    data = labeled_squares(40, 0)
    np.save(tmp_path / "x.npy", data.images)
    params = ClassifierParams(input_size=16, width=4, depth=(1, 1), epochs=2, batch_size=8, lr=1e-2,
                              eval_every_epochs=1, checkpoint_every_epochs=1, bootstrap=0)
    val = labeled_squares(12, 1)
    a, _ = fit(params, LabeledImages(NpyRows(tmp_path / "x.npy"), data.labels), val, seed=0, device="cpu",
               progress=False)
    b, _ = fit(params, data, val, seed=0, device="cpu", progress=False)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.config.mean == b.config.mean and a.config.std == b.config.std
    # the normalisation equals the old whole-set float32 statistics to the 6 digits the config keeps
    x = resize(to_image_tensor(data.images), 16)
    assert a.config.mean == round(float(x.mean()), 6) and a.config.std == round(max(float(x.std()), 1e-3), 6)


class Recording:
    """A row source that records which rows were read."""

    def __init__(self, a):
        self.a, self.read = a, []
        self.shape, self.dtype = a.shape, a.dtype

    def __len__(self):
        return len(self.a)

    def __getitem__(self, key):
        idx = np.arange(len(self.a))[key]
        self.read.extend(np.atleast_1d(idx).tolist())
        return self.a[key]


def test_ddp_ranks_read_disjoint_rows(monkeypatch):
    from test_vqgan import blobs, tiny_params

    from cxrsynth.models.vqgan import training_setup
    from cxrsynth.train import EpochSampler

    imgs = (blobs(32, 20) * 255).astype(np.uint8)
    p = tiny_params(batch_size=4)
    reads = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        src = Recording(imgs)
        s = training_setup(p, src, imgs[:4], seed=0, device="cpu", progress=False)
        src.read.clear()  # the fingerprint streams every row once; training batches are what a rank reads
        s.batches(2)
        reads[rank] = list(src.read)
    assert len(reads[0]) == len(reads[1]) == 4 and not set(reads[0]) & set(reads[1])
    assert sorted(reads[0] + reads[1]) == sorted(EpochSampler(32, 8, 0)(2).tolist())


def test_text_states_equal_one_text_at_a_time_encoding(tmp_path):
    from cxrsynth.models.text_states import TextStates, encode_text_states

    enc, tok = save_tiny_bert(tmp_path)
    texts = ["there is a right pleural effusion .", "the lungs are clear .", "no findings .",
             "there is a right pleural effusion .", "moderate cardiomegaly , the heart is enlarged ."]
    store = encode_text_states(enc, tok, texts, tmp_path / "states", max_length=16, batch_size=2)
    rows = np.array([4, 0, 3, 2])
    batch = store.batch(rows)
    for b, r in enumerate(rows):
        ids = tok([texts[r]], truncation=True, max_length=16, return_tensors="pt")
        with torch.no_grad():
            ref = enc(**ids).last_hidden_state[0]
        n = ref.shape[0]
        assert torch.equal(batch[b, :n], ref) and not batch[b, n:].any()
    assert len(store.offsets) == 5  # the repeated text is stored once
    mtime = (tmp_path / "states" / "states.npy").stat().st_mtime_ns
    again = encode_text_states(enc, tok, texts, tmp_path / "states", max_length=16)  # reused, not re-encoded
    assert (tmp_path / "states" / "states.npy").stat().st_mtime_ns == mtime
    assert torch.equal(again.batch(rows), batch)
    other = encode_text_states(enc, tok, texts[:3], tmp_path / "states", max_length=16)  # other texts: re-encoded
    assert len(other) == 3 and isinstance(other, TextStates)


def test_align_training_batches_equal_the_old_padded_cache(tmp_path):
    from test_align import TOY_PARAMS

    from cxrsynth.models.align_training import build_model, cache_hidden
    from toys import toy_pairs

    import dataclasses

    bert = tmp_path / "bert"
    bert.mkdir()
    save_tiny_bert(bert)
    pairs = toy_pairs(3, 0)
    p = dataclasses.replace(TOY_PARAMS, text_encoder="pretrained", text_model_path=str(bert), freeze_text=True)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    model = build_model(p, pairs.texts, codebook, (4, 4), tmp_path, str(bert), ())
    cache = cache_hidden(model, pairs.texts, tmp_path, chunk=5)
    tb = model.tokenize(pairs.texts)  # the old cache: every text tokenised at once, states per text, zero-padded
    model._text(pairs.texts)
    old = model.__dict__["_hidden_cache"]
    rows = np.array([7, 0, 11, 3])
    batch = cache.batch(rows)
    t = int(tb.attention_mask[rows].sum(1).max())
    assert torch.equal(batch["attention_mask"], tb.attention_mask[rows, :t])
    assert torch.equal(batch["word_mask"], tb.word_mask[rows, :t])
    for b, r in enumerate(rows):
        n = len(old[pairs.texts[r]])
        assert torch.equal(batch["hidden"][b, :n], old[pairs.texts[r]]) and not batch["hidden"][b, n:].any()


def test_frozen_text_states_cache_is_bounded_and_does_not_change_the_embeddings(tmp_path, monkeypatch):
    """The per-model cache of frozen text states keeps at most HIDDEN_CACHE_TEXTS texts (LRU); evicting and
    re-encoding a text gives exactly the states it had."""
    from test_align import TOY_PARAMS
    from toys import toy_pairs

    import dataclasses

    from cxrsynth.models import align as align_mod
    from cxrsynth.models.align_training import build_model

    bert = tmp_path / "bert"
    bert.mkdir()
    save_tiny_bert(bert)
    texts = list(dict.fromkeys(toy_pairs(3, 0).texts))
    assert len(texts) >= 4
    p = dataclasses.replace(TOY_PARAMS, text_encoder="pretrained", text_model_path=str(bert), freeze_text=True)
    codebook = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    model = build_model(p, texts, codebook, (4, 4), tmp_path, str(bert), ())
    _, full = model._text(texts)                        # default bound: everything stays
    assert len(model.__dict__["_hidden_cache"]) == len(texts)
    model.clear_cache()
    monkeypatch.setattr(align_mod, "HIDDEN_CACHE_TEXTS", 2)
    for t in texts:                                     # streamed one at a time: the cache never exceeds 2
        model._text([t])
        assert len(model.__dict__["_hidden_cache"]) <= 2
    assert list(model.__dict__["_hidden_cache"]) == texts[-2:]   # the most recent ones
    _, again = model._text(texts)                       # more texts in one call than the bound: all still right
    assert torch.equal(again, full) and len(model.__dict__["_hidden_cache"]) == 2
