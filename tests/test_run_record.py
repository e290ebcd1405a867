"""metrics.json says what ran (issue 17 item 4): every parameter a run changes at run time is
recorded as used beside the requested one, and each epoch's wall seconds are recorded."""

import json
import warnings

import pytest

from kdbench.core.spec import Recipe, RunSpec
from kdbench.engine.fit import fit
from kdbench.methods import LOSSES
from kdbench.methods.crd import CRD

from test_unlabeled_stream import spec as stl_spec, stl  # noqa: F401  (stl: a fixture, synthetic STL-10)


def spec(tiny, method, epochs=1, **overrides):
    return RunSpec("cifar100", str(tiny / "data"), "resnet8", method, 0, "resnet8", (str(tiny / "t.pt"),),
                   method_overrides=overrides, recipe=Recipe.from_config({"epochs": epochs}))


def test_a_parameter_a_term_changes_at_run_time_is_recorded_as_used(tiny, tmp_path, monkeypatch):
    """The mechanism, for any term: what ``used_params()`` reports is recorded as used."""
    monkeypatch.setattr(LOSSES.get("kd"), "used_params", lambda self: {"T": 2.5}, raising=False)
    m = fit(spec(tiny, "kd"), tmp_path / "kd", "cpu", progress=False)
    on_disk = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert on_disk["resolved_method"]["params"]["kd"]["T"] == 4.0  # what was asked stays recorded
    assert on_disk["used"]["params"]["kd"] == {"T": 2.5}
    assert on_disk["changed_at_run_time"] == {"kd.T": {"requested": 4.0, "used": 2.5}}
    assert m["changed_at_run_time"] == on_disk["changed_at_run_time"]


def test_nothing_changed_records_no_change(tiny, tmp_path):
    m = fit(spec(tiny, "kd"), tmp_path / "kd", "cpu", progress=False)
    assert m["used"]["params"] == {"kd": {"T": 4.0}} and m["changed_at_run_time"] == {}
    assert m["used"]["execution"]["teacher_cache"] == "none" and m["used"]["sgd_kernel"] == "foreach"


def test_crd_records_the_nce_k_it_drew(tiny, tmp_path, monkeypatch):
    """The recorded nce_k is the number of negatives each sample actually got (whatever CRD's rule
    for a training set smaller than nce_k: 5 classes × 8 images here, 32 of another class)."""
    drawn = set()
    real = CRD.contrast_indices

    def spy(self, index, generator=None):
        out = real(self, index, generator)
        drawn.add(out.shape[1] - 1)
        return out

    monkeypatch.setattr(CRD, "contrast_indices", spy)
    with warnings.catch_warnings(record=True):  # CRD may warn about nce_k
        m = fit(spec(tiny, "crd"), tmp_path / "crd", "cpu", progress=False)
    assert len(drawn) == 1
    (k,) = drawn
    assert m["resolved_method"]["params"]["crd"]["nce_k"] == 16384
    assert m["used"]["params"]["crd"]["nce_k"] == k
    assert m["changed_at_run_time"] == ({} if k == 16384 else {"crd.nce_k": {"requested": 16384, "used": k}})


def test_seconds_per_epoch_recorded_and_kept_across_a_resume(tiny, tmp_path):
    s = spec(tiny, "kd", epochs=3)
    first = fit(s, tmp_path / "r", "cpu", progress=False, stop_after_epochs=1)
    assert first["status"] == "stopped"
    m = fit(s, tmp_path / "r", "cpu", progress=False)
    secs = m["epoch_seconds"]["main"]
    assert len(secs) == 3 and all(t > 0 for t in secs)
    assert m["seconds_per_epoch"] == pytest.approx(sum(secs) / 3)
    assert sum(secs) <= m["wall_time_s"] + 1e-6
    assert [r["epoch"] for r in m["curve"]] == [1, 2, 3] and "seconds" not in m["curve"][0]  # curves stay exact


def test_init_stage_epochs_are_timed_apart(tiny, tmp_path):
    m = fit(spec(tiny, "ab", params={"ab": {"init_epochs": 1}}), tmp_path / "ab", "cpu", progress=False)
    assert set(m["epoch_seconds"]) == {"init:ab", "main"}
    assert len(m["epoch_seconds"]["init:ab"]) == 1 and len(m["epoch_seconds"]["main"]) == 1


def test_an_execution_option_skipped_at_run_time_is_recorded(stl, tmp_path):
    """The exact teacher cache covers the labelled training set: a run whose terms read an
    unlabelled stream skips it (a warning in the log) and its record says so."""
    with pytest.warns(UserWarning, match="teacher_cache skipped"):
        m = fit(stl_spec(stl, recipe=Recipe.from_config({"epochs": 1, "batch_size": 16}),
                         teacher_cache="fp32"), tmp_path / "run", "cpu", progress=False)
    assert m["spec"]["execution"]["teacher_cache"] == "fp32" and m["used"]["execution"]["teacher_cache"] == "none"
    assert m["changed_at_run_time"] == {"execution.teacher_cache": {"requested": "fp32", "used": "none"}}
