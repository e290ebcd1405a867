""".ci/run forces only the torch CPU kernel paths this CPU has (.ci/cpu_capabilities.py)."""

import importlib.util
import itertools
import subprocess
import sys

import pytest

from conftest import REPO

spec = importlib.util.spec_from_file_location("cpu_capabilities", REPO / ".ci/cpu_capabilities.py")
caps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(caps)

FLAGS = sorted({f for required in caps.REQUIRED_FLAGS.values() for f in required})
EPYC_NO_AVX512 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n"


@pytest.mark.parametrize("reported", ["DEFAULT", "AVX2", "AVX512"])
def test_every_flag_set_gets_a_nonempty_downward_closed_list_the_cpu_has(reported):
    for present in itertools.chain.from_iterable(itertools.combinations(FLAGS, k) for k in range(len(FLAGS) + 1)):
        flags = set(present) | {"sse2"}
        chosen, skipped = caps.choose(flags, reported)
        caps.check(chosen, flags)  # raises on an empty list or a path the CPU lacks
        assert chosen == list(caps.ORDER[:len(chosen)]), (present, chosen)  # default first, no gaps
        assert set(chosen) | set(skipped) == set(caps.ORDER) and not set(chosen) & set(skipped)
        for cap in chosen:
            assert set(caps.REQUIRED_FLAGS[cap]) <= flags
            assert caps.ORDER.index(cap) <= caps.ORDER.index(caps.capability_name(reported))


def test_check_fails_loudly_on_an_empty_list_or_a_path_the_cpu_lacks():
    with pytest.raises(SystemExit, match="no ATEN_CPU_CAPABILITY"):
        caps.check([], {"avx2", "fma"})
    with pytest.raises(SystemExit, match="avx512 chosen but this CPU lacks avx512bw"):
        caps.check(["default", "avx2", "avx512"], {"avx2", "fma", "avx512f", "avx512vl", "avx512dq"})


def test_an_avx2_epyc_skips_avx512_and_says_why(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(EPYC_NO_AVX512)
    out = subprocess.run([sys.executable, str(REPO / ".ci/cpu_capabilities.py"), "--cpuinfo", str(cpuinfo),
                          "--torch-reports", "AVX2"], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["default", "avx2"]
    assert "AMD EPYC 7B12" in out.stderr and "skipping avx512: this CPU lacks avx512f" in out.stderr


def test_this_machine_runs_every_path_it_has_each_proven_by_torch():
    out = subprocess.run([sys.executable, str(REPO / ".ci/cpu_capabilities.py")],
                         capture_output=True, text=True, check=True)
    chosen = out.stdout.split()
    flags = caps.cpu_flags(open("/proc/cpuinfo").read())
    assert chosen[0] == "default" and "proven by starting torch" in out.stderr
    if {"avx2", "fma"} <= flags:
        assert "avx2" in chosen
    if set(caps.REQUIRED_FLAGS["avx512"]) <= flags and caps.capability_name(caps.torch_native_capability()) == "avx512":
        assert chosen == ["default", "avx2", "avx512"]
