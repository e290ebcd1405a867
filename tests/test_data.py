import hashlib
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import stats

from kdbench.data import DatasetMissingError, load_dataset
from kdbench.data.cifar import ImageSet, read_cifar, write_cifar
from kdbench.data.loader import TensorLoader, crop_flip, random_crop
from kdbench.data.synthetic import make_synthetic
from kdbench.data.synthetic_files import ensure_synthetic


def test_cifar_roundtrip_official_layout(tmp_path):
    rng = np.random.default_rng(0)
    tr = ImageSet(rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 12), [f"c{i}" for i in range(4)])
    te = ImageSet(rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8), rng.integers(0, 4, 6), tr.classes)
    for name, files in (("cifar100", ["cifar-100-python/train", "cifar-100-python/meta"]),
                        ("cifar10", ["cifar-10-batches-py/data_batch_5", "cifar-10-batches-py/batches.meta"])):
        write_cifar(tmp_path / name, name, tr, te)
        for f in files:
            assert (tmp_path / name / f).is_file()
        got = read_cifar(tmp_path / name, name, "train")
        np.testing.assert_array_equal(got.images, tr.images)
        np.testing.assert_array_equal(got.labels, tr.labels)
        assert got.classes == tr.classes


def test_official_pickle_rows_are_channel_planes(tmp_path):
    """The official format stores each row as 1024 R, then 1024 G, then 1024 B values."""
    img = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    img[0, 0, 1, 0], img[0, 0, 0, 2] = 7, 9  # R at (0,1), B at (0,0)
    s = ImageSet(img, np.array([0]), ["a"])
    write_cifar(tmp_path, "cifar100", s, s)
    import pickle
    with open(tmp_path / "cifar-100-python/train", "rb") as f:
        row = pickle.load(f, encoding="bytes")[b"data"][0]
    assert row[1] == 7 and row[2048] == 9


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DatasetMissingError, match="kdbench fetch cifar100"):
        load_dataset("cifar100", str(tmp_path))


def test_synthetic_is_deterministic_and_class_conditional():
    a, _ = make_synthetic(classes=4, train_per_class=10, test_per_class=2, seed=3)
    b, _ = make_synthetic(classes=4, train_per_class=10, test_per_class=2, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    means = np.stack([a.images[a.labels == c].mean(0) for c in range(4)])
    within = np.mean([np.abs(a.images[a.labels == c] - means[c]).mean() for c in range(4)])
    between = np.abs(means[:, None] - means[None]).mean()
    assert between > 0.5 * within  # classes differ systematically


def test_synthetic_files_read_back_through_real_reader(tmp_path):
    ensure_synthetic("cifar100", str(tmp_path), {"classes": 3, "train_per_class": 4, "test_per_class": 2})
    ds = load_dataset("cifar100", str(tmp_path))
    assert ds.num_classes == 3 and ds.train.images.shape == (12, 32, 32, 3) and ds.test.images.shape == (6, 32, 32, 3)


def test_synthetic_marker_removed_by_snakemake_restores_it_without_rewriting_the_data(tmp_path):
    """Snakemake deletes the marker (its output) before it reruns make-data, e.g. in a second
    invocation sharing the root while the first one's runs read the files: the same parameters
    with every file in place restore the marker only; a missing file or other parameters regenerate."""
    params = {"classes": 3, "train_per_class": 4, "test_per_class": 2, "seed": 0}
    marker = ensure_synthetic("cifar100", str(tmp_path), params)

    def stamps():
        return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(tmp_path.rglob("*"))
                if p.is_file() and p.name.startswith(("train", "test", "meta"))}
    before = stamps()
    assert len(before) == 3
    marker.unlink()
    assert ensure_synthetic("cifar100", str(tmp_path), params) == marker and marker.is_file()
    assert stamps() == before  # not one byte rewritten
    victim = next(iter(before))
    victim.unlink()
    marker.unlink()
    ensure_synthetic("cifar100", str(tmp_path), params)
    assert victim.is_file() and read_cifar(tmp_path, "cifar100", "train").images.shape == (12, 32, 32, 3)
    ensure_synthetic("cifar100", str(tmp_path), {**params, "train_per_class": 5})  # other parameters: regenerated
    assert read_cifar(tmp_path, "cifar100", "train").images.shape == (15, 32, 32, 3)


def test_crop_equals_torchvision_crop_of_zero_padded_image():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=g)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    dy, dx = torch.tensor([0, 8, 3, 5, 1]), torch.tensor([8, 0, 4, 2, 7])
    out = random_crop(padded, 32, dy, dx)
    for i in range(5):
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(dy[i]), int(dx[i]), 32, 32)
        assert torch.equal(out[i], ref)


def test_augmentation_distribution_matches_repdistiller():
    """RandomCrop(32, padding=4): 81 offsets equally likely; flips independent with p=1/2."""
    n = 8100
    x = torch.zeros(n, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 16, 16], x[:, :, 16, 17] = 255, 128  # a marker pair: position gives the offset, order the flip
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    out = crop_flip(padded, 32, 4, torch.Generator().manual_seed(1))
    idx = (out[:, 0] == 255).flatten(1).float().argmax(1)
    row, col = idx // 32, idx % 32
    flipped = out[torch.arange(n), 0, row, col - 1] == 128  # the 128 pixel moved to the left
    col = torch.where(flipped, 31 - col, col)
    offsets_y, offsets_x = 20 - row, 20 - col  # the marker sits at padded position (20, 20)
    counts = np.bincount((offsets_y * 9 + offsets_x).numpy(), minlength=81)
    assert counts.sum() == n
    assert stats.chisquare(counts).pvalue > 1e-3
    assert stats.binomtest(int(flipped.sum()), n, 0.5).pvalue > 1e-3
    # flip independent of offset: flip rate similar in left and right halves of offsets
    left = flipped[offsets_x < 4].float().mean()
    right = flipped[offsets_x > 4].float().mean()
    assert abs(float(left - right)) < 0.05


def test_loader_normalises_like_totensor_normalize():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    loader = TensorLoader(imgs, np.arange(3), mean, std, batch_size=2, train=False)
    x = torch.cat([b[0] for b in loader.batches()])
    ref = torch.stack([TF.normalize(TF.to_tensor(i), mean, std) for i in imgs])
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-5)
    assert len(loader) == 2  # last partial batch kept


def test_epoch_order_is_a_function_of_the_generator_seed():
    imgs = np.zeros((10, 32, 32, 3), dtype=np.uint8)
    loader = TensorLoader(imgs, np.arange(10), (0.5,) * 3, (0.5,) * 3, batch_size=4, train=True)
    order = lambda s: torch.cat([b[2] for b in loader.batches(torch.Generator().manual_seed(s))])
    assert torch.equal(order(5), order(5)) and not torch.equal(order(5), order(6))
    assert sorted(order(5).tolist()) == list(range(10))


def test_label_noise_relabels_that_fraction_of_train_labels_to_other_classes_only():
    kw = dict(classes=7, train_per_class=300, test_per_class=20, seed=5, noise=0.3)
    clean_train, clean_test = make_synthetic(**kw)
    for rate in (0.1, 0.35):
        train, test = make_synthetic(**kw, label_noise=rate)
        flipped = train.labels != clean_train.labels
        n = len(flipped)
        assert abs(flipped.mean() - rate) < 3 * np.sqrt(rate * (1 - rate) / n)  # binomial, 3 sd
        assert np.array_equal(train.images, clean_train.images)  # the same images: only labels change
        assert np.array_equal(test.labels, clean_test.labels) and np.array_equal(test.images, clean_test.images)
        # the new class is uniform over the 6 others: each gets ~1/6 of the flipped labels
        shift = (train.labels[flipped] - clean_train.labels[flipped]) % 7
        counts = np.bincount(shift, minlength=7)
        assert counts[0] == 0 and all(abs(c - flipped.sum() / 6) < 4 * np.sqrt(flipped.sum() / 6) for c in counts[1:])


def test_label_noise_zero_writes_the_files_it_wrote_before_label_noise_existed():
    # sha256 of the default suite's data before `label_noise` was added (2026-12-04)
    train, test = make_synthetic(classes=10, train_per_class=80, test_per_class=100, seed=0, noise=0.35)
    digest = hashlib.sha256(train.images.tobytes() + train.labels.tobytes() + test.images.tobytes()
                            + test.labels.tobytes()).hexdigest()
    assert digest == "163422b64696a5f8c934c79eae1125ac413a9f1698904d7eb97e64905f5c087c"


@pytest.mark.parametrize("rate", [-0.1, 1.0, 1.5])
def test_label_noise_outside_0_1_is_refused(rate):
    with pytest.raises(ValueError, match=r"label_noise.*\[0, 1\)"):
        make_synthetic(classes=3, train_per_class=2, test_per_class=1, label_noise=rate)
