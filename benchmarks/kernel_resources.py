"""Resource report of the CUDA kernels: registers, spills, shared memory, CTAs per SM, HMMA / LDSM.

    python benchmarks/kernel_resources.py                   # markdown, sm_80/90/90a/100
    python benchmarks/kernel_resources.py --json out.json   # also the raw figures

No GPU needed, only nvcc. Every csrc/cuda/*.cu is compiled on its own, with the flags of the real
build (setup.py plus the half/bf16 macros torch adds), for each architecture with -Xptxas -v:
registers, spill stores and loads, stack frame and static shared memory per kernel. Where a
cuobjdump is found (the toolkit's, else the one in the triton wheel) the SASS of each kernel is
read too: HMMA and HGMMA (tensor-core products: mma.sync, and sm_90a's wgmma), LDSM (ldmatrix),
LDGSTS (cp.async) and 128-bit global stores are counted, and the block size comes from
__launch_bounds__ (EIATTR_MAX_THREADS). sm_90a is the arch-specific target whose code has wgmma
(the opt-in wgmma retrieval kernels; on plain sm_90 they compile to a trap).

The retrieval launchers pick their kernels and shared memory per device at run time. A small
host program (benchmarks/kernel_resources_probe.cpp, linked with the retrieval sources' host
code; it makes no CUDA call) prints what they pick at the report shape on each architecture's
shared memory (one plan per device: sm_90a is sm_90's), and the report turns that into CTAs per SM:
min(registers, shared memory + 1 KB reserved per block, threads, 32). Compiled objects are
cached under build/kernel_resources/ by a hash of the sources and flags.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
PROBE = Path(__file__).resolve().parent / "kernel_resources_probe.cpp"

# Per-SM limits: registers, shared memory per SM, opt-in shared memory per block, threads.
ARCHS = {
    "80": dict(regs=65536, smem_per_sm=167936, smem_optin=166912, threads=2048),
    "90": dict(regs=65536, smem_per_sm=233472, smem_optin=232448, threads=2048),
    "90a": dict(regs=65536, smem_per_sm=233472, smem_optin=232448, threads=2048),
    "100": dict(regs=65536, smem_per_sm=233472, smem_optin=232448, threads=2048),
}
DEFAULT_ARCHS = ["80", "90", "90a", "100"]
ARCH_ORDER = {a: i for i, a in enumerate(ARCHS)}
MAX_CTAS_PER_SM = 32
# The flags of the real build: setup.py's nvcc flags plus the ones torch's cpp_extension adds.
NVCC_FLAGS = [
    "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-DGAM_EXT_WITH_CUDA",
    "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
]  # fmt: skip
SASS_OPS = {
    "hmma": r"\bHMMA\.",
    "hgmma": r"\bHGMMA\.",
    "ldsm": r"\bLDSM\.",
    "ldgsts": r"\bLDGSTS\.",
    "stg128": r"\bSTG\.E[.A-Z]*\.128\b",
}


@dataclass
class Kernel:
    arch: str  # "80", "90", "90a", ...
    source: str
    symbol: str
    name: str = ""  # demangled
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    static_smem: int = 0
    max_threads: int | None = None
    sass: dict[str, int] = field(default_factory=dict)


@dataclass
class Launch:
    arch: str
    op: str
    dtype: str
    kernel: str
    threads: int
    smem: int  # dynamic
    static_smem: int = 0
    registers: int | None = None
    spill_bytes: int | None = None
    ctas_per_sm: int | None = None
    limited_by: str = ""
    sass: dict[str, int] = field(default_factory=dict)


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").is_file():
            return str(Path(os.environ[var]) / "bin" / "nvcc")
    return shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").is_file() else None
    )


def find_cuobjdump(nvcc: str) -> str | None:
    cands = [Path(nvcc).resolve().parent / "cuobjdump"]
    if shutil.which("cuobjdump"):
        cands.append(Path(shutil.which("cuobjdump")))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            cands.append(Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump")
    return next((str(c) for c in cands if c.is_file() and os.access(c, os.X_OK)), None)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "ASAN_OPTIONS")}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


def cache_dir(nvcc: str, csrc: Path, archs: list[str]) -> Path:
    h = hashlib.sha1()
    for p in sorted(csrc.rglob("*")):
        if p.is_file() and p.suffix in (".cu", ".cuh", ".h", ".cpp") and "emu" not in p.parts:
            h.update(p.relative_to(csrc).as_posix().encode())
            h.update(p.read_bytes())
    h.update(PROBE.read_bytes())
    h.update(" ".join([nvcc, *NVCC_FLAGS, *archs]).encode())
    d = ROOT / "build" / "kernel_resources" / h.hexdigest()[:16]
    d.mkdir(parents=True, exist_ok=True)
    return d


def compile_source(nvcc: str, src: Path, csrc: Path, archs: list[str], out: Path) -> str:
    """Compiles src to out (an object with one cubin per arch); returns ptxas's -v report."""
    log = out.with_suffix(".ptxas.txt")
    if out.is_file() and log.is_file():
        return log.read_text()
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    proc = run([nvcc, "-c", *NVCC_FLAGS, *gencode, "-Xptxas", "-v", "-I", str(csrc), str(src),
                "-o", str(out)], timeout=1800)  # fmt: skip
    if proc.returncode != 0:
        sys.exit(f"kernel_resources: nvcc failed on {src}:\n{proc.stderr[-4000:]}")
    log.write_text(proc.stderr)
    return proc.stderr


def parse_ptxas(report: str, source: str) -> list[Kernel]:
    kernels: list[Kernel] = []
    cur: Kernel | None = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\w+)'", line)
        if m:
            cur = Kernel(arch=m.group(2), source=source, symbol=m.group(1))
            kernels.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.stack, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur.static_smem = int(s.group(1)) if s else 0
    return kernels


def demangle(symbols: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if filt is None or not symbols:
        return {s: s for s in symbols}
    out = run([filt], input="\n".join(symbols) + "\n").stdout.splitlines()
    return dict(zip(symbols, out, strict=False))


def read_sass(cuobjdump: str, obj: Path) -> dict[tuple[str, str], dict[str, int]]:
    """(arch, symbol) -> counts of the SASS_OPS and max threads, from cuobjdump."""
    counts: dict[tuple[str, str], dict[str, int]] = {}
    arch, func = None, None
    for line in run([cuobjdump, "-sass", str(obj)]).stdout.splitlines():
        m = re.search(r"code for sm_(\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.search(r"Function : (\S+)", line)
        if m and arch is not None:
            func = m.group(1)
            counts[(arch, func)] = {k: 0 for k in SASS_OPS}
            continue
        if func is not None and arch is not None:
            for k, pat in SASS_OPS.items():
                if re.search(pat, line):
                    counts[(arch, func)][k] += 1
    # Block sizes from __launch_bounds__: EIATTR_MAX_THREADS in each kernel's .nv.info section.
    arch, func = None, None
    elf = run([cuobjdump, "-elf", str(obj)]).stdout.splitlines()
    for i, line in enumerate(elf):
        m = re.search(r"arch = sm_(\w+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"\.nv\.info\.(\S+)", line)
        if m:
            func = m.group(1)
        if "EIATTR_MAX_THREADS" in line and func and arch is not None:
            for nxt in elf[i + 1 : i + 4]:
                v = re.search(r"Value:\s+(0x[0-9a-f]+)", nxt)
                if v:
                    entry = counts.setdefault((arch, func), {k: 0 for k in SASS_OPS})
                    entry["max_threads"] = int(v.group(1), 16)
                    break
    return counts


def ctas_per_sm(arch: str, regs: int, threads: int, smem: int) -> tuple[int, str]:
    lim = ARCHS[arch]
    warps = (threads + 31) // 32
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "shared memory": lim["smem_per_sm"] // (smem + 1024),
        "threads": lim["threads"] // threads,
        "CTA slots": MAX_CTAS_PER_SM,
    }
    n = min(by.values())
    return n, "/".join(k for k, v in by.items() if v == n)


def probe_launches(nvcc: str, csrc: Path, objs: dict[str, Path], build: Path, archs: list[str],
                   shape: tuple[int, int, int]) -> list[Launch] | str:  # fmt: skip
    needed = [objs.get("memory_retrieval_fwd.cu"), objs.get("memory_retrieval_bwd.cu")]
    if not all(needed):
        return "the retrieval sources are missing"
    exe = build / "probe"
    if not exe.is_file():
        proc = run([nvcc, "-std=c++17", "-I", str(csrc), str(PROBE), *map(str, needed), "-o", str(exe)],
                   timeout=600)  # fmt: skip
        if proc.returncode != 0:
            return "the probe did not build: " + " ".join(proc.stderr.split())[:300]
    launches = []
    for arch in archs:
        if not arch.isdigit():
            continue  # sm_90a: the same device as sm_90, whose plan the sm_90 rows give
        lim = ARCHS[arch]
        proc = run([str(exe), arch, str(lim["smem_optin"]), str(lim["smem_per_sm"]), *map(str, shape)])
        if proc.returncode != 0:
            return "the probe failed: " + proc.stderr[-300:]
        for line in proc.stdout.splitlines():
            op, dtype, kernel, threads, smem = line.split("\t")
            launches.append(Launch(arch, op, dtype, kernel, int(threads), int(smem)))
    return launches


def collect(archs: list[str], shape: tuple[int, int, int], csrc: Path = CSRC) -> dict:
    nvcc = find_nvcc()
    if nvcc is None:
        sys.exit("kernel_resources: nvcc not found (set CUDA_HOME)")
    cuobjdump = find_cuobjdump(nvcc)
    build = cache_dir(nvcc, csrc, archs)
    kernels: list[Kernel] = []
    objs: dict[str, Path] = {}
    for src in sorted((csrc / "cuda").glob("*.cu")):
        obj = build / (src.stem + ".o")
        report = compile_source(nvcc, src, csrc, archs, obj)
        objs[src.name] = obj
        found = parse_ptxas(report, src.name)
        if cuobjdump:
            sass = read_sass(cuobjdump, obj)
            for k in found:
                c = dict(sass.get((k.arch, k.symbol), {}))
                k.max_threads = c.pop("max_threads", None)
                k.sass = c
        kernels.extend(found)
    names = demangle(sorted({k.symbol for k in kernels}))
    for k in kernels:
        k.name = names.get(k.symbol, k.symbol)
    launches = probe_launches(nvcc, csrc, objs, build, archs, shape)
    if isinstance(launches, list):
        for ln in launches:
            match = [k for k in kernels if k.arch == ln.arch and ln.kernel in k.name]
            if match:
                k = match[0]
                ln.registers = k.registers
                ln.static_smem = k.static_smem
                ln.spill_bytes = k.spill_stores + k.spill_loads
                ln.sass = k.sass
                ln.ctas_per_sm, ln.limited_by = ctas_per_sm(
                    ln.arch, k.registers, ln.threads, ln.smem + k.static_smem
                )
    nvcc_version = run([nvcc, "--version"]).stdout.strip().splitlines()[-1]
    return {
        "date": datetime.date.today().isoformat(),
        "nvcc": nvcc_version,
        "cuobjdump": cuobjdump,
        "archs": archs,
        "shape": dict(zip(("rows", "slots", "dim"), shape, strict=True)),
        "kernels": [asdict(k) for k in kernels],
        "launches": [asdict(x) for x in launches] if isinstance(launches, list) else launches,
    }


def short(name: str) -> str:
    """A demangled kernel name without namespaces and parameter list."""
    name = re.sub(r"\(.*\)$", "", name.replace("(anonymous namespace)::", ""))
    name = re.sub(r"^void ", "", name)
    return re.sub(r"\bgam::cuda::", "", name)


def markdown(data: dict, sources: str = "") -> str:
    """The report as markdown; `sources` keeps the per-kernel table to files whose name holds it."""
    lines = []
    shape = data["shape"]
    lines.append(
        f"Resource report, {data['date']}: {data['nvcc']}; SASS read with "
        f"{'cuobjdump' if data['cuobjdump'] else '(no cuobjdump found)'}; `python "
        "benchmarks/kernel_resources.py`."
    )
    lines.append("")
    if isinstance(data["launches"], list):
        lines.append(
            f"Retrieval launches at rows={shape['rows']} S={shape['slots']} D={shape['dim']} "
            "(what the fused path's launchers, GAM_EXT_RETRIEVAL=fused, pick with each "
            "architecture's shared memory; the default gemm path runs cuBLAS around the softmax "
            "kernels):"
        )
        lines.append("")
        lines.append(
            "| arch | op | dtype | kernel | threads | smem KB | regs | spill B | CTAs/SM (limit) "
            "| HMMA | HGMMA | LDSM | LDGSTS |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for ln in data["launches"]:
            s = ln["sass"]
            lines.append(
                f"| sm_{ln['arch']} | {ln['op']} | {ln['dtype']} | `{ln['kernel']}` | {ln['threads']} | "
                f"{(ln['smem'] + ln['static_smem']) / 1024:.1f} | {ln['registers']} | {ln['spill_bytes']} | "
                f"{ln['ctas_per_sm']} ({ln['limited_by']}) | {s.get('hmma', '-')} | {s.get('hgmma', '-')} | "
                f"{s.get('ldsm', '-')} | {s.get('ldgsts', '-')} |"
            )
    else:
        lines.append(f"(No retrieval launch plan: {data['launches']}.)")
    lines.append("")
    lines.append("Every kernel (static shared memory only; block size from `__launch_bounds__`):")
    lines.append("")
    lines.append(
        "| arch | source | kernel | regs | spill st/ld B | stack B | static smem B | max threads "
        "| HMMA | HGMMA | LDSM | LDGSTS | STG.128 |"
    )
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    kernels = [k for k in data["kernels"] if sources in k["source"]]
    for k in sorted(kernels, key=lambda k: (ARCH_ORDER.get(k["arch"], 99), k["source"], k["name"])):
        s = k["sass"]
        lines.append(
            f"| sm_{k['arch']} | {k['source']} | `{short(k['name'])}` | {k['registers']} | "
            f"{k['spill_stores']}/{k['spill_loads']} | {k['stack']} | {k['static_smem']} | "
            f"{k['max_threads'] or '-'} | {s.get('hmma', '-')} | {s.get('hgmma', '-')} | "
            f"{s.get('ldsm', '-')} | {s.get('ldgsts', '-')} | {s.get('stg128', '-')} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", default=",".join(DEFAULT_ARCHS), help="targets, e.g. 80,90,90a,100")
    ap.add_argument("--rows", type=int, default=16 * 4096, help="B * N of the report shape")
    ap.add_argument("--slots", type=int, default=512)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--csrc", default=str(CSRC), help="the csrc folder to compile (default: this tree)")
    ap.add_argument("--json", help="also write the raw figures to this file")
    ap.add_argument("--sources", default="", help="per-kernel table only for files whose name holds this")
    args = ap.parse_args()
    archs = args.archs.split(",")
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        sys.exit(f"kernel_resources: no SM limits for sm_{unknown[0]} (known: {', '.join(ARCHS)})")
    data = collect(archs, (args.rows, args.slots, args.dim), Path(args.csrc).resolve())
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=1))
    sys.stdout.write(markdown(data, args.sources))


if __name__ == "__main__":
    main()
