"""The exact teacher-output cache (kdbench/engine/teacher_cache.py) and the loader's view ids."""

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms

from kdbench.data.loader import TensorLoader, view_id, view_params
from kdbench.data.synthetic_files import ensure_synthetic
from kdbench.engine import teacher_cache
from kdbench.engine.checkpoint import save_model
from kdbench.engine.teachers import TeacherEnsemble
from kdbench.engine.fast import Runtime
from kdbench.core.spec import Execution, Recipe, RunSpec
from kdbench.engine.teacher_cache import TeacherCache, cacheable, get_cache
from kdbench.engine.fit import fit
from kdbench.methods import METHODS, MethodContext, build_objective
from kdbench.models import build_model, feature_shapes

MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


@pytest.fixture(autouse=True)
def fresh_memo():
    teacher_cache.clear_memo()
    yield
    teacher_cache.clear_memo()


def loader(n=6, batch=4, seed=0):
    imgs = np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return TensorLoader(imgs, np.arange(n) % 3, MEAN, STD, batch_size=batch, train=True)


def teacher(seed=0, classes=3):
    torch.manual_seed(seed)
    return build_model("resnet8", classes).eval()


def test_view_ids_leave_draws_and_images_unchanged_and_describe_the_view():
    ld = loader(n=10)
    plain = list(ld.batches(torch.Generator().manual_seed(3)))
    with_views = list(ld.batches(torch.Generator().manual_seed(3), views=True))
    assert ld.num_views == 162
    for (x, y, i), (x2, y2, i2, v) in zip(plain, with_views):
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(i, i2)
        assert torch.equal(ld.view_images(i2, v), x)  # the view id reproduces the image exactly
    all_views = torch.arange(162)
    assert torch.equal(view_id(*view_params(all_views, 4), 4), all_views)
    dy, dx, flip = view_params(all_views, 4)
    assert dy.max() == dx.max() == 8 and flip.sum() == 81


def _decode(img: torch.Tensor) -> int:
    """The (dy, dx, flip) view of a crop of the marker image, as a view id."""
    pos = (img[0] == 255).flatten().float().argmax()
    row, col = int(pos // 32), int(pos % 32)
    flipped = col > 0 and int(img[0, row, col - 1]) == 128
    col = 31 - col if flipped else col
    return int(view_id(torch.tensor(20 - row), torch.tensor(20 - col), torch.tensor(flipped), 4))


def test_view_distribution_equals_torchvision_random_crop_and_flip():
    """Loader views vs torchvision RandomCrop(32, padding=4) + RandomHorizontalFlip on PIL images."""
    n = 8100
    marker = np.zeros((32, 32, 3), dtype=np.uint8)
    marker[16, 16, 0], marker[16, 17, 0] = 255, 128
    from PIL import Image
    tf = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.PILToTensor()])
    torch.manual_seed(0)
    ref = np.bincount([_decode(tf(Image.fromarray(marker))) for _ in range(n)], minlength=162)
    ld = TensorLoader(np.repeat(marker[None], n, 0), np.zeros(n), (0, 0, 0), (1 / 255,) * 3, batch_size=n, train=True)
    x, _, _, view = next(ld.batches(torch.Generator().manual_seed(1), views=True))
    decoded = torch.tensor([_decode(img.round().to(torch.uint8)) for img in x])  # std 1/255, mean 0: raw pixels
    assert torch.equal(decoded, view)
    ours = np.bincount(view.numpy(), minlength=162)
    assert ref.sum() == ours.sum() == n
    assert stats.chi2_contingency(np.stack([ref, ours])).pvalue > 1e-3


def test_lookups_equal_the_online_teacher_on_the_same_views():
    ld, t = loader(), teacher()
    cache = TeacherCache.build(t, ld, build_batch=128)
    assert cache.table.shape == (6, 162, 3 + 64) and cache.table.dtype == torch.float32
    for x, _, idx, view in ld.batches(torch.Generator().manual_seed(0), views=True):
        online, cached = t(x), cache.lookup(idx, view)
        torch.testing.assert_close(cached.logits, online.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cached.pooled, online.pooled, rtol=1e-5, atol=1e-5)
    every = torch.arange(162)  # all 162 views of sample 4
    online = t(ld.view_images(torch.full_like(every, 4), every))
    torch.testing.assert_close(cache.lookup(torch.full_like(every, 4), every).logits, online.logits, rtol=1e-5, atol=1e-5)


def test_ensemble_members_are_cached_for_fkd():
    ld = loader()
    ens = TeacherEnsemble([teacher(0), teacher(1)]).eval()
    cache = TeacherCache.build(ens, ld)
    x, _, idx, view = next(ld.batches(torch.Generator().manual_seed(2), views=True))
    online, cached = ens(x), cache.lookup(idx, view)
    assert len(cached.members) == 2
    for a, b in zip(online.members, cached.members):
        torch.testing.assert_close(b.pooled, a.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached.logits, online.logits, rtol=1e-5, atol=1e-5)


def test_only_logit_and_pooled_methods_are_cacheable():
    ld, t = loader(), teacher()
    ctx = MethodContext(feature_shapes(build_model("resnet8", 3)), feature_shapes(t), 3, ld.labels)
    for method, expected in (("kd", True), ("crd", True), ("rkd", True), ("fitnet", False), ("at", False),
                             ("student", False)):
        objective = build_objective(METHODS.get(method).with_overrides(
            {"params": {"crd": {"nce_k": 2}}} if method == "crd" else None), ctx)
        assert cacheable(objective.teacher_needs) is expected, method
        runtime = Runtime(Execution(teacher_cache="fp32"), "cpu")
        runtime.attach_cache(t if objective.needs_teacher else None, objective, ld)
        assert (runtime.cache is not None) is expected, method


def test_a_run_with_the_cache_has_the_metrics_of_a_run_without(tmp_path):
    """KD and CRD for 2 epochs: equal to 1e-6 relative (observed: bit for bit on CPU)."""
    ensure_synthetic("cifar100", str(tmp_path / "data"), {"classes": 4, "train_per_class": 6, "test_per_class": 3})
    torch.manual_seed(0)
    save_model(tmp_path / "t.pt", build_model("resnet8", 4), "resnet8", 4, "cifar100")
    recipe = Recipe.from_config({"epochs": 2, "batch_size": 8})
    for method in ("kd", "crd"):
        overrides = {"params": {"crd": {"nce_k": 8}}} if method == "crd" else {}
        runs = [fit(RunSpec("cifar100", str(tmp_path / "data"), "resnet8", method, 0, "resnet8", (str(tmp_path / "t.pt"),),
                            method_overrides=overrides, recipe=recipe, execution=Execution(teacher_cache=c)),
                    tmp_path / f"{method}-{c}", "cpu", progress=False) for c in ("none", "fp32")]
        assert runs[0]["hash"] == runs[1]["hash"]
        for a, b in zip(runs[0]["curve"], runs[1]["curve"]):
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-9), (method, k)


def test_cache_is_reused_from_disk_and_keyed_by_content(tmp_path, monkeypatch):
    ld, t = loader(), teacher()
    built = get_cache(t, ld, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("teacher-*.pt"))
    assert len(files) == 1 and built.key in files[0].name
    teacher_cache.clear_memo()

    def no_build(*a, **k):
        raise AssertionError("rebuilt")
    monkeypatch.setattr(TeacherCache, "build", classmethod(no_build))
    again = get_cache(t, ld, cache_dir=str(tmp_path))  # read back, not rebuilt
    assert torch.equal(again.table, built.table) and again.layout == built.layout
    changed = teacher()
    with torch.no_grad():
        next(changed.parameters())[0, 0, 0, 0] += 1e-3
    with pytest.raises(AssertionError, match="rebuilt"):  # another teacher: another key
        get_cache(changed, ld, cache_dir=str(tmp_path))
    with pytest.raises(AssertionError, match="rebuilt"):  # another storage dtype: another key
        get_cache(t, ld, dtype="bf16", cache_dir=str(tmp_path))


def test_lossy_storage_rounds_and_is_hashed():
    ld, t = loader(), teacher()
    exact, half = TeacherCache.build(t, ld), TeacherCache.build(t, ld, dtype="bf16")
    assert half.table.dtype == torch.bfloat16
    idx, view = torch.arange(6), torch.arange(6) * 27
    a, b = exact.lookup(idx, view), half.lookup(idx, view)
    assert b.logits.dtype == torch.float32  # returned in the dtype the teacher produced
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-2, atol=1e-2)
    assert not torch.equal(b.pooled, a.pooled)
    with pytest.raises(ValueError, match="valid: fp32, bf16, fp16"):
        TeacherCache.build(t, ld, dtype="int8")


def test_cache_covers_every_sample_of_a_sharded_loader_that_drops_a_tail_batch():
    """Under DDP an epoch may skip a last global batch smaller than the ranks; the cache must
    still hold every training sample, since any of them can be drawn in another epoch."""
    from kdbench.data.sharded import ShardedTensorLoader
    imgs = np.random.default_rng(0).integers(0, 256, (9, 32, 32, 3), dtype=np.uint8)
    sharded = ShardedTensorLoader(imgs, np.arange(9) % 3, (0.5,) * 3, (0.5,) * 3, batch_size=4, train=True,
                                  rank=0, world_size=2)
    assert sharded.num_samples == 8  # the last global batch of 1 sample is dropped in an epoch
    cache = TeacherCache.build(teacher(), sharded, build_batch=4)
    assert cache.num_samples == 9
    index = torch.tensor([8])
    ref = teacher().eval()(sharded.view_images(index, torch.tensor([7])))
    torch.testing.assert_close(cache.lookup(index, torch.tensor([7])).logits, ref.logits)
