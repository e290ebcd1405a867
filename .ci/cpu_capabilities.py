"""The torch CPU kernel paths (``ATEN_CPU_CAPABILITY``) this machine can run, for .ci/run.

torch picks its vectorised kernels per CPU (ATen's DispatchStub): ``avx512`` needs AVX-512 F, VL,
BW and DQ plus FMA; ``avx2`` needs AVX2 plus FMA; ``default`` runs anywhere. Forcing a path the CPU
lacks is not downgraded by torch 2.14: the process dies with an illegal instruction. So the
numerics subset runs under every path the CPU has *and* torch itself would pick on it (its own
report with the variable unset), never above, and each chosen path is proven by starting torch
under it and reading back the path it took, before any test runs.

    python3 .ci/cpu_capabilities.py            # prints the chosen paths (stdout), why (stderr)
    python3 .ci/cpu_capabilities.py --cpuinfo F --torch-reports AVX2   # what another CPU would get

Exits non-zero, naming the cause, when the list would be empty, when it holds a path the CPU lacks,
or when torch under a chosen path crashes or reports another one.
"""

import argparse
import os
import subprocess
import sys

ORDER = ("default", "avx2", "avx512")
REQUIRED_FLAGS = {
    "default": (),
    "avx2": ("avx2", "fma"),
    "avx512": ("avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"),
}
_PROBE = (
    "import torch; x = torch.randn(2, 3, 8, 8); w = torch.randn(4, 3, 3, 3);"
    " torch.nn.functional.conv2d(x, w).sum().item(); (x.flatten(1) @ x.flatten(1).T).sum().item();"
    " print(torch.backends.cpu.get_cpu_capability())"
)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The feature flags of /proc/cpuinfo's first processor (x86 ``flags``; empty elsewhere)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def capability_name(reported: str) -> str:
    """torch's report (``DEFAULT``, ``AVX2``, ``AVX512``, ...) as an ATEN_CPU_CAPABILITY value."""
    name = reported.strip().lower()
    if name.startswith("avx512"):
        return "avx512"
    return name if name in ORDER else "default"


def torch_native_capability() -> str:
    """The path torch picks on this CPU by itself (ATEN_CPU_CAPABILITY unset), in a child process."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def choose(flags: set[str], torch_reports: str) -> tuple[list[str], dict[str, str]]:
    """(paths to run, {path skipped: why}): each path whose flags the CPU has, up to torch's own pick."""
    native = ORDER.index(capability_name(torch_reports))
    chosen, skipped = [], {}
    for rank, cap in enumerate(ORDER):
        missing = [f for f in REQUIRED_FLAGS[cap] if f not in flags]
        if missing:
            skipped[cap] = f"this CPU lacks {', '.join(missing)} (forcing it dies with an illegal instruction)"
        elif skipped:  # each path's kernels also use the instructions of the ones below it
            skipped[cap] = f"a lower path ({', '.join(skipped)}) is not runnable on this CPU"
        elif rank > native:
            skipped[cap] = f"torch picks {torch_reports} on this CPU and has no {cap} kernels to run here"
        else:
            chosen.append(cap)
    return chosen, skipped


def check(chosen: list[str], flags: set[str]) -> None:
    """Refuse an empty list or one that holds a path the CPU lacks: CI would test nothing, or crash."""
    if not chosen:
        raise SystemExit("cpu_capabilities: no ATEN_CPU_CAPABILITY to run the numerics subset under")
    for cap in chosen:
        if cap not in REQUIRED_FLAGS:
            raise SystemExit(f"cpu_capabilities: unknown capability {cap!r}; valid: {', '.join(ORDER)}")
        missing = [f for f in REQUIRED_FLAGS[cap] if f not in flags]
        if missing:
            raise SystemExit(f"cpu_capabilities: {cap} chosen but this CPU lacks {', '.join(missing)}")


def prove(cap: str) -> None:
    """Start torch under ``cap`` and run a conv and a matmul: it must survive and report ``cap``."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"cpu_capabilities: torch under ATEN_CPU_CAPABILITY={cap} exited {out.returncode}:"
                         f" {out.stderr.strip()[-300:]}")
    got = capability_name(out.stdout.strip().splitlines()[-1])
    if got != cap:
        raise SystemExit(f"cpu_capabilities: ATEN_CPU_CAPABILITY={cap} ran torch's {got} kernels instead")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpuinfo", default="/proc/cpuinfo", help="a cpuinfo file (default: this machine's)")
    parser.add_argument("--torch-reports", help="torch's own pick on that CPU (default: ask this torch)")
    args = parser.parse_args(argv)
    with open(args.cpuinfo) as f:
        cpuinfo = f.read()
    flags = cpu_flags(cpuinfo)
    this_machine = args.torch_reports is None
    reported = torch_native_capability() if this_machine else args.torch_reports
    chosen, skipped = choose(flags, reported)
    check(chosen, flags)
    if this_machine:
        for cap in chosen:
            prove(cap)
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    print(f"cpu_capabilities: {model}; torch picks {reported}; running the numerics subset under "
          f"{', '.join(chosen)}{' (each proven by starting torch under it)' if this_machine else ''}", file=sys.stderr)
    for cap, why in skipped.items():
        print(f"cpu_capabilities: skipping {cap}: {why}", file=sys.stderr)
    print(" ".join(chosen))


if __name__ == "__main__":
    main()
