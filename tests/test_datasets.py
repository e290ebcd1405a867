"""Each dataset's real on-disk format, written here independently of kdbench's writers, read
through the real readers and loaders (nothing is downloaded)."""

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from kdbench.data import DATASETS, DatasetInfo, DatasetMissingError, TensorLoader, load_dataset
from kdbench.data.fetch import fetch
from kdbench.data.stl10 import read_stl10
from kdbench.data.svhn import read_svhn
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.data.tinyimagenet import read_tinyimagenet, refolder_val

RNG = np.random.default_rng(0)


def images(n, h, w=None):
    return RNG.integers(0, 256, (n, h, w or h, 3), dtype=np.uint8)


def pil_resize(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


# --------------------------------------------------------------------------- SVHN

def write_svhn_mat(path, x_nhwc, digits):
    """The official layout: X is 32×32×3×N, y is N×1 with 10 standing for the digit 0."""
    scipy.io.savemat(path, {"X": np.moveaxis(x_nhwc, 0, -1), "y": np.where(digits == 0, 10, digits)[:, None]})


def test_svhn_mat_files(tmp_path):
    tr, te, ex = images(7, 32), images(3, 32), images(2, 32)
    dtr, dte, dex = np.array([0, 1, 2, 3, 9, 0, 5]), np.array([0, 8, 7]), np.array([4, 0])
    for name, x, d in (("train", tr, dtr), ("test", te, dte), ("extra", ex, dex)):
        write_svhn_mat(tmp_path / f"{name}_32x32.mat", x, d)
    ds = load_dataset("svhn", str(tmp_path))
    np.testing.assert_array_equal(ds.train.images, tr)
    np.testing.assert_array_equal(ds.train.labels, dtr)  # label 10 read as digit 0
    np.testing.assert_array_equal(ds.test.labels, dte)
    assert ds.num_classes == 10
    both = load_dataset("svhn_extra", str(tmp_path))
    np.testing.assert_array_equal(both.train.images, np.concatenate([tr, ex]))
    np.testing.assert_array_equal(both.train.labels, np.concatenate([dtr, dex]))
    np.testing.assert_array_equal(read_svhn(tmp_path, "extra").labels, dex)


def test_svhn_training_crops_are_never_mirrored(tmp_path):
    """SVHN trains with random crops but no flips (digits are not mirror-symmetric); CIFAR flips."""
    x = images(1, 32)
    write_svhn_mat(tmp_path / "train_32x32.mat", np.repeat(x, 16, 0), np.arange(16) % 10)
    write_svhn_mat(tmp_path / "test_32x32.mat", x, np.array([1]))
    train, _ = load_dataset("svhn", str(tmp_path)).loaders(16, 16, "cpu")
    padded = np.pad(x[0], ((4, 4), (4, 4), (0, 0)))
    crops = {padded[dy:dy + 32, dx:dx + 32].tobytes() for dy in range(9) for dx in range(9)}
    mirrored = {padded[dy:dy + 32, dx:dx + 32][:, ::-1].tobytes() for dy in range(9) for dx in range(9)}
    mean, std = np.array(DATASETS.get("svhn").mean), np.array(DATASETS.get("svhn").std)

    def raw(xb):
        return np.rint((xb.permute(0, 2, 3, 1).numpy() * std + mean) * 255).astype(np.uint8)

    for epoch in range(3):
        for xb, _, _ in train.batches(torch.Generator().manual_seed(epoch)):
            assert all(r.tobytes() in crops for r in raw(xb))
    # the same images with CIFAR's augmentation (flips on): some crops are mirrored
    from kdbench.data.loader import TensorLoader
    flipping = TensorLoader(np.repeat(x, 16, 0), np.zeros(16), mean, std, 16, True)
    xb, _, _ = next(flipping.batches(torch.Generator().manual_seed(0)))
    assert any(r.tobytes() in mirrored and r.tobytes() not in crops for r in raw(xb))


def test_svhn_missing_and_corrupt_files_say_how_to_fix(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"kdbench fetch svhn --root .*train_32x32.mat|train_32x32.mat.*kdbench fetch svhn"):
        load_dataset("svhn", str(tmp_path))
    (tmp_path / "train_32x32.mat").write_bytes(b"not a mat file")
    (tmp_path / "test_32x32.mat").write_bytes(b"")
    with pytest.raises(DatasetMissingError, match="cannot be read as a MATLAB v5 file"):
        load_dataset("svhn", str(tmp_path))
    with pytest.raises(DatasetMissingError, match="kdbench fetch svhn_extra"):
        read_svhn(tmp_path, "extra")


# --------------------------------------------------------------------------- STL-10

def write_stl10_binary(base, split, x_nhwc, labels_1_10=None):
    """Official binary: per image 3 planes of 96×96, each stored column-major; labels 1..10."""
    with open(base / f"{split}_X.bin", "wb") as f:
        for img in x_nhwc:
            for c in range(3):
                f.write(img[:, :, c].flatten(order="F").tobytes())
    if labels_1_10 is not None:
        np.asarray(labels_1_10, dtype=np.uint8).tofile(base / f"{split}_y.bin")


def test_stl10_binary_files(tmp_path):
    base = tmp_path / "stl10_binary"
    base.mkdir()
    tr, te, un = images(4, 96), images(3, 96), images(2, 96)
    tr[0, 0, 5] = (255, 0, 0)  # row 0, column 5: catches a transposed reader
    write_stl10_binary(base, "train", tr, [1, 10, 3, 1])
    write_stl10_binary(base, "test", te, [2, 2, 7])
    write_stl10_binary(base, "unlabeled", un)
    (base / "class_names.txt").write_text("airplane\nbird\ncar\ncat\ndeer\ndog\nhorse\nmonkey\nship\ntruck\n")
    native = read_stl10(tmp_path, "train", size=96)
    np.testing.assert_array_equal(native.images, tr)
    assert tuple(native.images[0, 0, 5]) == (255, 0, 0)
    np.testing.assert_array_equal(native.labels, [0, 9, 2, 0])
    assert native.classes[9] == "truck" and len(native.classes) == 10
    ds = load_dataset("stl10", str(tmp_path))  # both transfer protocols: 32 px
    np.testing.assert_array_equal(ds.test.images, np.stack([pil_resize(i, 32) for i in te]))
    np.testing.assert_array_equal(ds.test.labels, [1, 1, 6])
    unl = read_stl10(tmp_path, "unlabeled")
    assert unl.images.shape == (2, 32, 32, 3) and (unl.labels == -1).all()
    assert len(read_stl10(tmp_path, "train+unlabeled").labels) == 6


def test_stl10_missing_or_truncated(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"stl10_binary.*kdbench fetch stl10 --root"):
        load_dataset("stl10", str(tmp_path))
    base = tmp_path / "stl10_binary"
    base.mkdir()
    (base / "train_X.bin").write_bytes(b"\0" * 1000)
    (base / "train_y.bin").write_bytes(b"\1")
    (base / "class_names.txt").write_text("a\n")
    with pytest.raises(DatasetMissingError, match="truncated"):
        read_stl10(tmp_path, "train")


# --------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n09999999", "n01443537", "n02085620"]  # wnids.txt is not sorted in the release


def write_tiny(root, per_class=3, val_per_class=2, gray=True):
    base = root / "tiny-imagenet-200"
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (base / "words.txt").write_text("".join(f"{w}\tthing {w}\n" for w in WNIDS + ["n00000001"]))
    for w in WNIDS:
        d = base / "train" / w / "images"
        d.mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(images(1, 64)[0]).save(d / f"{w}_{k}.JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    if gray:
        Image.fromarray(images(1, 64)[0, :, :, 0], mode="L").save(base / "train" / WNIDS[0] / "images" / "gray.JPEG")
    lines, k = [], 0
    for w in WNIDS:
        for _ in range(val_per_class):
            Image.fromarray(images(1, 64)[0]).save(base / "val" / "images" / f"val_{k}.JPEG")
            lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63\n")
            k += 1
    (base / "val" / "val_annotations.txt").write_text("".join(lines))
    return base


def decode(path, size=None):
    im = Image.open(path).convert("RGB")
    return np.asarray(im.resize((size, size), Image.BILINEAR) if size else im)


def test_tinyimagenet_flat_val_and_refoldering(tmp_path):
    base = write_tiny(tmp_path)
    order = sorted(WNIDS)  # class k = k-th wnid in sorted order (ImageFolder / mdistiller)
    ds = load_dataset("tinyimagenet", str(tmp_path))
    assert ds.num_classes == 3 and ds.train.images.shape == (10, 32, 32, 3)  # 9 RGB + 1 grayscale, at 32 px
    k = order.index(WNIDS[0])
    assert (ds.train.labels == k).sum() == 4
    native = read_tinyimagenet(tmp_path, "train", size=64)
    files = [f for w in order for f in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    np.testing.assert_array_equal(native.images, np.stack([decode(f) for f in files]))
    gray = native.images[[i for i, f in enumerate(files) if f.name == "gray.JPEG"][0]]
    assert (gray[..., 0] == gray[..., 1]).all()
    flat = read_tinyimagenet(tmp_path, "test", size=64)
    ann = dict(line.split("\t")[:2] for line in (base / "val/val_annotations.txt").read_text().splitlines())
    val_files = sorted((base / "val/images").glob("*.JPEG"))
    np.testing.assert_array_equal(flat.labels, [order.index(ann[f.name]) for f in val_files])

    assert refolder_val(tmp_path) == 6
    assert not (base / "val/images").exists()
    assert sorted(p.name for p in (base / "val" / WNIDS[1] / "images").iterdir()) == ["val_2.JPEG", "val_3.JPEG"]
    assert refolder_val(tmp_path) == 0  # idempotent
    again = read_tinyimagenet(tmp_path, "test", size=64)
    key = lambda s: sorted(zip(s.labels.tolist(), map(bytes, s.images)))  # noqa: E731
    assert key(again) == key(flat)  # same images, same labels


def test_tinyimagenet_errors(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"wnids.txt is missing.*kdbench fetch tinyimagenet --root"):
        load_dataset("tinyimagenet", str(tmp_path))
    base = write_tiny(tmp_path, gray=False)
    Image.fromarray(images(1, 64)[0]).save(base / "val/images/stray.JPEG")
    with pytest.raises(DatasetMissingError, match="not in val_annotations.txt"):
        read_tinyimagenet(tmp_path, "test")


def test_fetch_tinyimagenet_refolders_an_unzipped_copy_offline(tmp_path):
    base = write_tiny(tmp_path)
    fetch("tinyimagenet", str(tmp_path))  # wnids.txt present: no download, only the re-foldering
    assert (base / "val" / WNIDS[2] / "images" / "val_5.JPEG").is_file()


def padded_views(img, pad):
    """Every training view of ``img`` (H×W×3 uint8), by view id: crop at (dy, dx) of the
    ``pad``-px zero-padded image, then flipped or not (written here with numpy alone)."""
    size, big = img.shape[0], np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
    side = 2 * pad + 1
    crops = {(dy, dx): big[dy:dy + size, dx:dx + size] for dy in range(side) for dx in range(side)}
    return {(dy * side + dx) * 2 + f: c[:, ::-1] if f else c for (dy, dx), c in crops.items() for f in (0, 1)}


def test_tinyimagenet64_reads_the_release_at_64px_and_pads_8(tmp_path):
    base = write_tiny(tmp_path, gray=False)
    order = sorted(WNIDS)
    ds = load_dataset("tinyimagenet64", str(tmp_path))
    files = [f for w in order for f in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    np.testing.assert_array_equal(ds.train.images, np.stack([decode(f) for f in files]))  # native: no resize
    assert ds.train.images.shape == (9, 64, 64, 3) and ds.test.images.shape == (6, 64, 64, 3)
    info = DATASETS.get("tinyimagenet64")
    assert (info.image_size, info.pad, info.flip, info.mean) == (64, 8, True, DATASETS.get("tinyimagenet").mean)
    assert load_dataset("tinyimagenet", str(tmp_path)).train.images.shape[1:] == (32, 32, 3)  # the 32-px protocols

    train, test = ds.loaders(4, 4, "cpu")
    assert (train.pad, train.num_views, tuple(train.images.shape[-2:])) == (8, 2 * 17 ** 2, (80, 80))
    assert test.num_views == 1 and tuple(test.images.shape[-2:]) == (64, 64)
    mean, std = np.array(info.mean) * 255, np.array(info.std) * 255
    offsets = []
    for x, y, idx, view in train.batches(torch.Generator().manual_seed(0), views=True):
        assert x.shape[1:] == (3, 64, 64)
        for xi, i, v in zip(x, idx.tolist(), view.tolist()):
            want = (padded_views(ds.train.images[i], 8)[v] - mean) / std
            np.testing.assert_allclose(xi.permute(1, 2, 0).numpy(), want, atol=1e-4)
            offsets += [(v // 2) // 17, (v // 2) % 17]
    far = 2 * (16 * 17 + 16) + 1  # the bottom-right crop, flipped: only reachable with 8 px of padding
    got = train.view_images(torch.tensor([0]), torch.tensor([far]))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(got, (padded_views(ds.train.images[0], 8)[far] - mean) / std, atol=1e-4)
    assert max(offsets) > 8  # the random crops use the 8-px padding (offsets 0..16)


@pytest.mark.parametrize("arch", ["ResNet18", "ResNet34", "ResNet18-0.5", "ShuffleNet"])
def test_kda_models_run_at_64px(arch):
    from kdbench.models import build_model, feature_shapes

    model = build_model(arch, 200)
    at32, at64 = feature_shapes(model, 32), feature_shapes(model, 64)
    assert at64.pooled == at32.pooled and at64.logits == torch.Size([200])
    for a, b in zip(at32.stages, at64.stages):  # every map twice as large, same channels
        assert b == torch.Size([a[0], 2 * a[1], 2 * a[2]])


def test_a_kda_pair_trains_on_synthetic_tinyimagenet64(tmp_path):
    """The synthetic writer writes the release's 64×64 JPEGs; a KDA run reads them at 64 px and
    trains (ResNet18-0.5 → ShuffleNet, KDA before + after the FC; two epochs of one step, the
    warm-up cut to one epoch, as KDA's targets are the previous epoch's class means)."""
    from kdbench.engine.checkpoint import save_model
    from kdbench.core.spec import Recipe, RunSpec
    from kdbench.engine.fit import fit
    from kdbench.models import build_model

    root = tmp_path / "data"
    ensure_synthetic("tinyimagenet64", str(root), {"classes": 3, "train_per_class": 4, "test_per_class": 2})
    jpeg = next((root / "tiny-imagenet-200" / "train").rglob("*.JPEG"))
    assert Image.open(jpeg).size == (64, 64) and Image.open(jpeg).format == "JPEG"
    torch.manual_seed(0)
    save_model(tmp_path / "t.pt", build_model("ResNet18-0.5", 3), "ResNet18-0.5", 3, "tinyimagenet64")
    spec = RunSpec("tinyimagenet64", str(root), "ShuffleNet", "kda_combo", 0, "ResNet18-0.5", (str(tmp_path / "t.pt"),),
                   method_overrides={"params": {t: {"warmup_epochs": 1} for t in ("kda", "kda_logits")}},
                   recipe=Recipe.from_config({"epochs": 2, "batch_size": 12}))
    m = fit(spec, tmp_path / "run", device="cpu", progress=False)
    assert m["status"] == "ok" and len(m["curve"]) == 2
    assert all(np.isfinite(v) for e in m["curve"] for v in e.values())
    assert m["curve"][1]["kda"] > 0 and m["curve"][1]["kda_logits"] > 0


def test_teacher_cache_has_every_view_of_the_8px_padding():
    from kdbench.engine.teacher_cache import TeacherCache
    from kdbench.core.features import Features

    class Tiny(torch.nn.Module):  # a linear read-out of the mean colour and one corner pixel
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(6, 2)

        def forward(self, x):
            pooled = torch.cat([x.mean((2, 3)), x[:, :, 0, 0]], 1)
            return Features([], [], pooled, self.fc(pooled))

    imgs = images(2, 64)
    info = DATASETS.get("tinyimagenet64")
    ld = TensorLoader(imgs, np.arange(2), info.mean, info.std, batch_size=2, train=True, pad=info.pad)
    cache = TeacherCache.build(Tiny(), ld)
    assert (cache.num_samples, cache.num_views) == (2, 578)
    views = padded_views(imgs[1], 8)
    mean, std = np.array(info.mean) * 255, np.array(info.std) * 255
    for v in (0, 577, 2 * (16 * 17) + 1):
        corner = (views[v][0, 0] - mean) / std
        got = cache.lookup(torch.tensor([1]), torch.tensor([v])).pooled[0, 3:]
        np.testing.assert_allclose(got.numpy(), corner, atol=1e-4)


# --------------------------------------------------------------------------- one file per dataset

def test_a_dataset_is_one_registration(tmp_path, monkeypatch):
    """One ``register_dataset`` call makes a dataset loadable, fetchable and writable as synthetic data."""
    from kdbench.data import register_dataset
    from kdbench.data.cifar import read_cifar, write_cifar

    monkeypatch.setattr(DATASETS, "_items", dict(DATASETS._items))  # registered for this test only
    fetched = []

    def fetch_toy(root):
        if fetched:
            raise OSError("host unreachable")
        fetched.append(root)

    register_dataset(DatasetInfo("toy", lambda r, s: read_cifar(r, "cifar10", s), (0.5,) * 3, (0.25,) * 3,
                                 howto=lambda r: f"put cifar-10-batches-py/ in {r}", fetch=fetch_toy,
                                 write_synthetic=lambda r, tr, te: write_cifar(r, "cifar10", tr, te), pad=2))
    ensure_synthetic("toy", str(tmp_path), {"classes": 3, "train_per_class": 4, "test_per_class": 2})
    ds = load_dataset("toy", str(tmp_path))
    assert ds.num_classes == 3 and ds.loaders(4, 4, "cpu")[0].num_views == 2 * 5 ** 2
    fetch("toy", str(tmp_path))
    assert fetched == [str(tmp_path)]
    with pytest.raises(SystemExit, match=rf"kdbench fetch toy: host unreachable\nput cifar-10-batches-py/ in {tmp_path}"):
        fetch("toy", str(tmp_path))  # a failed download says how to place the files by hand
    with pytest.raises(ValueError, match="registered twice"):
        register_dataset(DATASETS.get("toy"))
    with pytest.raises(KeyError, match=r"unknown dataset 'tiny'.*Valid choices: .*tinyimagenet64"):
        load_dataset("tiny", str(tmp_path))
    with pytest.raises(SystemExit, match=r"cannot fetch 'nope'; valid: .*toy"):
        fetch("nope", str(tmp_path))


# --------------------------------------------------------------------------- ImageNet

def write_imagenet_tree(root, train_per_class=2, val_per_class=1, size=(300, 260)):
    wn = ["n01440764", "n01443537"]
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for w in wn:
            (root / split / w).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(images(1, size[1], size[0])[0]).save(root / split / w / f"{w}_{k}.JPEG")
    return wn


def test_imagenet_folders_and_the_standard_test_transform(tmp_path):
    import torchvision.transforms as T

    wn = write_imagenet_tree(tmp_path)
    ds = load_dataset("imagenet", str(tmp_path))
    assert ds.num_classes == 2 and ds.train.classes == wn and len(ds.train) == 4
    np.testing.assert_array_equal(ds.test.labels, [0, 1])
    train, test = ds.loaders(3, 2, "cpu", workers=0)
    info = DATASETS.get("imagenet")
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(info.mean, info.std)])
    (x, y, idx), = list(test.batches())
    want = torch.stack([ref(Image.open(p).convert("RGB")) for p in ds.test.paths])
    torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
    batches = list(train.batches(torch.Generator().manual_seed(0)))
    assert [b[0].shape for b in batches] == [(3, 3, 224, 224), (1, 3, 224, 224)]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == [0, 1, 2, 3]
    again = list(train.batches(torch.Generator().manual_seed(0)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # a resumed epoch replays


def test_imagenet_layout_errors(tmp_path):
    with pytest.raises(DatasetMissingError, match=r"ILSVRC2012_img_train.tar.*kdbench fetch imagenet"):
        load_dataset("imagenet", str(tmp_path))
    write_imagenet_tree(tmp_path, val_per_class=0)
    for d in (tmp_path / "val").iterdir():
        d.rmdir()
    Image.fromarray(images(1, 8)[0]).save(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(DatasetMissingError, match="val set is still flat"):
        load_dataset("imagenet", str(tmp_path))
    (tmp_path / "val" / "n99999999").mkdir()
    with pytest.raises(DatasetMissingError, match="differ from train"):
        load_dataset("imagenet", str(tmp_path))
    with pytest.raises(SystemExit, match="not present in the root directory"):
        fetch("imagenet", str(tmp_path / "empty"))


# --------------------------------------------------------------------------- synthetic data

@pytest.mark.parametrize("name", ["svhn", "svhn_extra", "stl10", "tinyimagenet", "tinyimagenet64", "imagenet"])
def test_synthetic_sets_are_written_in_the_real_format(tmp_path, name):
    ensure_synthetic(name, str(tmp_path), {"classes": 3, "train_per_class": 4, "test_per_class": 2})
    ds = load_dataset(name, str(tmp_path))
    assert len(ds.train.labels) == 12 + (3 if name == "svhn_extra" else 0) and len(ds.test.labels) == 6
    assert set(ds.train.labels.tolist()) == {0, 1, 2}
