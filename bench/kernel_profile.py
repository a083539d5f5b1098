"""Static performance profile of the CUDA kernels, from their compiled code: no GPU needed.

    python bench/kernel_profile.py [--arch sm_80 sm_86 sm_90] [--json PATH]
    python bench/kernel_profile.py --record-fa2 FWD.cubin BWD.cubin --fa2-flags "..."

For every kernel of csrc/cuda (each CUDA source of csrc/SOURCES compiled with nvcc -cubin for each
architecture): registers, spills and static shared memory (ptxas -v), dynamic shared memory and
threads per block (from the kernels' own traits, printed by a host program built from the same
headers), blocks and warps per SM, and the instruction mix of the main loop per warp and
iteration (SASS from cuobjdump): HMMA, LDSM, LDS, STS, STSM, LDGSTS, LDG, BAR, SHFL, MUFU, FLOP. The main
loop is the loop with the most HMMA (the innermost loop nest around them is reported as such:
a loop with inner loops has `inner_loops` > 0 and its counts cover one pass of its own body only).

FlashAttention-2's forward and backward (hdim 128, fp16) are profiled from cubins built once from
the flash-attn sdist (see bench/results/fa2_static_sm90.json for how) and printed beside ours.

The roofline columns are an ESTIMATE from these counts and the machine constants in MACHINES
(tensor-core, shared-memory, SFU and issue rates per SM): per warp and iteration the time of each
resource, the slowest bounds the loop, and est_tflops = peak x (tensor time / bound time). It
ignores latency, occupancy effects beyond the counts, L2/HBM traffic and everything outside the
main loop. It is not a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
FA2_RECORD = RESULTS / "fa2_static_sm90.json"

# Per SM. Occupancy limits from the CUDA programming guide's compute-capability table.
ARCHS = {
    "sm_80": dict(regs=65536, max_warps=64, max_blocks=32, smem_per_sm=164 * 1024, smem_per_block=163 * 1024),
    "sm_86": dict(regs=65536, max_warps=48, max_blocks=16, smem_per_sm=100 * 1024, smem_per_block=99 * 1024),
    "sm_90": dict(regs=65536, max_warps=64, max_blocks=32, smem_per_sm=228 * 1024, smem_per_block=227 * 1024),
}
RESERVED_SMEM_PER_BLOCK = 1024  # the driver's reservation per block (sm_80 and later)

# Roofline constants (assumptions, per SM and clock): dense fp16/bf16 mma.sync FLOP, shared-memory
# bytes, SFU (MUFU) lanes, instructions issued (4 schedulers x 1).
MACHINES = {
    "A100-SXM (sm_80)": dict(arch="sm_80", sms=108, ghz=1.41, mma_flop=2048, smem_bytes=128, sfu=16, issue=4),
    # H100's tensor cores reach their 4096 FLOP/clk/SM only through wgmma; mma.sync (what these
    # kernels and FlashAttention-2 use) is taken at two thirds of it.
    "H100-SXM (sm_90)": dict(arch="sm_90", sms=132, ghz=1.83, mma_flop=4096 * 2 // 3, smem_bytes=128, sfu=16, issue=4),
}

# kernel base name -> C++ expressions (threads, dynamic shared bytes[, whether the host launches
# this instantiation on a device with {smem} bytes of shared memory per SM]) given its template
# args (a0, a1, ...), evaluated by a host program that includes the kernels' headers. None: the
# dynamic size depends on the call (reported as such, left out of the occupancy).
KERNEL_TRAITS = {
    "attention_fwd_kernel": ("atp::cuda::FwdTraits<{a1}, {a2}>::kThreads", "atp::cuda::FwdTraits<{a1}, {a2}>::kSmemBytes",
                             "atp::cuda::fwd_block_k_for<{a1}>({a4}, {smem}) == {a2}"),
    "attention_fwd_combine_kernel": ("128", "0"),
    "attention_bwd_delta_kernel": ("128", "0"),
    "attention_bwd_kernel": ("atp::cuda::BwdTiles<{a1}, {a2}>::kThreads", "atp::cuda::BwdTiles<{a1}, {a2}>::kSmemBytes",
                             "atp::cuda::bwd_large_tiles({smem}) == {a2}"),
    "attention_bwd_dq_kernel": ("256", "0"),
    "cross_scores_kernel": ("128", None),
    "cross_scores_tc_kernel": ("atp::cuda::CrossTcTraits<{a1}>::kThreads", "atp::cuda::CrossTcTraits<{a1}>::kSmemBytes",
                               "atp::cuda::cross_scores_on_tensor_cores(0, {a1})"),
    "soft_mask_fwd_kernel": ("256", "0"),
    "soft_mask_bwd_kernel": ("256", "0"),
}

CATEGORIES = ("HMMA", "LDSM", "LDS", "STS", "STSM", "LDGSTS", "LDG", "STG", "BAR", "SHFL", "MUFU")
# The shared-memory instructions (stmatrix, STSM, is sm_90's: one per four STS.32 of the same bytes).
SHARED = ("LDSM", "LDS", "STS", "STSM")
# Bytes of shared memory one warp instruction moves, by opcode width suffix (32 lanes).
WIDTH_BYTES = {".128": 16, ".64": 8, ".U16": 2, ".S16": 2, ".U8": 1, ".S8": 1}


# ----------------------------------------------------------------------------------------------
# tools

def toolkit_bin(name: str) -> str:
    """A CUDA tool from the toolkit nvcc belongs to, else from the registry's nvidia wheels."""
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", os.devnull], capture_output=True, text=True)
        m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if m:
            candidates.append(Path(m.group(1)) / "bin" / name)
    try:
        import nvidia  # the nvidia-cuda-cuobjdump / nvidia-cuda-nvdisasm wheels
        for root in nvidia.__path__:
            candidates += sorted(Path(root).glob(f"*/bin/{name}"))
    except ImportError:
        pass
    found = shutil.which(name)
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.exists():
            return str(c)
    sys.exit(f"kernel_profile: {name} not found (the toolkit has none; `pip install nvidia-cuda-cuobjdump "
             f"nvidia-cuda-nvdisasm` provides it)")


def cuda_sources() -> list[Path]:
    """The [cuda] .cu files of csrc/SOURCES."""
    section, out = None, []
    for line in (REPO / "csrc" / "SOURCES").read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif line and not line.startswith("#") and section == "[cuda]" and line.endswith(".cu"):
            out.append(REPO / line)
    return out


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return dict(zip(names, out.stdout.splitlines()))


def base_and_args(demangled: str) -> tuple[str, list[str]]:
    """('attention_fwd_kernel', ['__half', '128', '64', 'false']) from a demangled kernel name."""
    m = re.match(r"(?:void )?(?:[\w:]+::)?(\w+)(?:<(.*)>)?\(", demangled.replace("(anonymous namespace)::", ""))
    if not m:
        return demangled, []
    args, depth, cur = [], 0, ""
    for ch in m.group(2) or "":
        if ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        depth += ch in "<("
        depth -= ch in ">)"
        cur += ch
    if cur.strip():
        args.append(cur.strip())
    return m.group(1), [a.replace("(bool)1", "true").replace("(bool)0", "false") for a in args]


# ----------------------------------------------------------------------------------------------
# ptxas -v and SASS

def compile_cubin(src: Path, arch: str, out: Path, extra: list[str] = ()) -> dict[str, dict]:
    """Builds one cubin; per mangled kernel name: registers, spill bytes, static smem bytes."""
    cmd = ["nvcc", "-O3", "-std=c++17", "--expt-relaxed-constexpr", f"-arch={arch}", "-cubin", "-Xptxas", "-v",
           f"-I{REPO / 'csrc'}", *extra, str(src), "-o", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"kernel_profile: nvcc failed on {src}:\n{res.stderr[-3000:]}")
    return parse_ptxas(res.stderr)


def parse_ptxas(text: str) -> dict[str, dict]:
    info, name = {}, None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
            info[name] = dict(registers=0, spill_stores=0, spill_loads=0, static_smem=0)
            continue
        if name is None:
            continue
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            info[name]["spill_stores"], info[name]["spill_loads"] = int(m.group(1)), int(m.group(2))
        if m := re.search(r"Used (\d+) registers", line):
            info[name]["registers"] = int(m.group(1))
        if m := re.search(r"(\d+) bytes smem", line):
            info[name]["static_smem"] = int(m.group(1))
    return info


def sass_functions(cubin: Path) -> dict[str, list[tuple[int, str]]]:
    """Mangled name -> [(address, instruction text)] from cuobjdump -sass (which runs nvdisasm,
    found beside it)."""
    env = dict(os.environ)  # cuobjdump finds nvdisasm on PATH
    env["PATH"] = os.pathsep.join([str(Path(toolkit_bin("nvdisasm")).parent), env.get("PATH", "")])
    res = subprocess.run([toolkit_bin("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        sys.exit(f"kernel_profile: cuobjdump -sass failed on {cubin}: {res.stderr.strip()[-500:]} "
                 f"(it needs nvdisasm beside it: pip install nvidia-cuda-nvdisasm)")
    text = res.stdout
    funcs, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m and cur is not None:
            cur.append((int(m.group(1), 16), m.group(2).strip()))
    return funcs


def opcode(ins: str) -> str:
    """The opcode; "" for an instruction predicated off (@!PT: padding that never executes)."""
    if ins.startswith("@!PT "):
        return ""
    ins = re.sub(r"^@!?U?P\w+\s+", "", ins)  # predicate
    return ins.split()[0] if ins else ""


def category(op: str) -> str | None:
    base = op.split(".")[0]
    if base in CATEGORIES:
        return base
    return None


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(start, end) address ranges of the loops: backward branches and their targets."""
    out = []
    for addr, ins in code:
        if opcode(ins) == "BRA":
            m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?(0x[0-9a-f]+)", ins)
            if m and int(m.group(1), 16) <= addr:
                out.append((int(m.group(1), 16), addr))
    return out


def loop_mix(code, lo, hi) -> dict:
    """Instruction counts of one pass through [lo, hi] (inner loops counted once)."""
    mix = {c: 0 for c in CATEGORIES}
    mix.update(instructions=0, smem_bytes=0, hmma_flop=0)
    for addr, ins in code:
        if not lo <= addr <= hi:
            continue
        op = opcode(ins)
        if not op:
            continue
        mix["instructions"] += 1
        cat = category(op)
        if cat is None:
            continue
        mix[cat] += 1
        if cat == "HMMA":
            shape = re.search(r"HMMA\.(\d+)", op)  # 16816: m16 n8 k16; 1688: m16 n8 k8
            k = int(shape.group(1)[3:]) if shape and shape.group(1).startswith("168") else 16
            mix["hmma_flop"] += 2 * 16 * 8 * k
        elif cat in ("LDSM", "STSM"):
            mix["smem_bytes"] += 512 if ".4" in op else (256 if ".2" in op else 128)
        elif cat in ("LDS", "STS"):
            width = next((b for s, b in WIDTH_BYTES.items() if s in op), 4)
            mix["smem_bytes"] += 32 * width
        elif cat == "LDGSTS":
            width = next((b for s, b in WIDTH_BYTES.items() if s in op), 4)
            mix["smem_bytes"] += 32 * width
    return mix


def main_loop(code) -> dict | None:
    """The loop with the most HMMA (ties: the later one), with its inner-loop count."""
    best = None
    for lo, hi in loops(code):
        mix = loop_mix(code, lo, hi)
        inner = sum(1 for a, b in loops(code) if lo <= a and b < hi and (a, b) != (lo, hi))
        key = (mix["HMMA"], lo)
        if best is None or key > best[0]:
            best = (key, dict(mix, inner_loops=inner, start=hex(lo), end=hex(hi)))
    return best[1] if best else None


# ----------------------------------------------------------------------------------------------
# occupancy and the estimate

def occupancy(arch: str, registers: int, threads: int, smem: int | None) -> dict:
    a = ARCHS[arch]
    warps = max(1, threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // 256) * 256
    by_regs = (a["regs"] // regs_per_warp) // warps
    by_warps = a["max_warps"] // warps
    by_smem = a["max_blocks"] if not smem else (a["smem_per_sm"] // (smem + RESERVED_SMEM_PER_BLOCK)
                                                if smem <= a["smem_per_block"] else 0)
    blocks = min(by_regs, by_warps, by_smem, a["max_blocks"])
    limit = min((by_regs, "registers"), (by_smem, "shared memory"), (by_warps, "warps"))[1]
    return dict(blocks_per_sm=blocks, warps_per_sm=blocks * warps, limited_by=limit)


def estimate(mix: dict) -> dict:
    out = {}
    for name, m in MACHINES.items():
        t_tc = mix["hmma_flop"] / m["mma_flop"]
        t_smem = mix["smem_bytes"] / m["smem_bytes"]
        t_sfu = mix["MUFU"] * 32 / m["sfu"]
        t_issue = mix["instructions"] / m["issue"]
        bound_t, bound = max((t_tc, "tensor"), (t_smem, "shared memory"), (t_sfu, "SFU"), (t_issue, "issue"))
        peak = m["mma_flop"] * m["sms"] * m["ghz"] / 1e3
        out[name] = dict(bound=bound, cycles_per_iter_per_sm=round(bound_t, 1),
                         est_tflops=round(peak * t_tc / bound_t, 1) if bound_t else 0.0,
                         peak_mma_sync_tflops=round(peak, 1))
    return out


# ----------------------------------------------------------------------------------------------
# our kernels

def traits_values(bases_args: set[tuple[str, tuple[str, ...]]]) -> dict:
    """(threads, dynamic smem, {arch: launched}) of each (kernel, template args), printed by a
    host program built from the kernels' headers."""
    exprs = {}
    for base, args in bases_args:
        t = KERNEL_TRAITS.get(base)
        if t is None:
            continue
        fmt = {f"a{i}": a for i, a in enumerate(args)}
        launched = {arch: t[2].format(**fmt, smem=a["smem_per_sm"]) if len(t) > 2 else "true"
                    for arch, a in ARCHS.items()}
        exprs[(base, args)] = (t[0].format(**fmt), t[1].format(**fmt) if t[1] is not None else "-1", launched)
    keys = sorted(exprs)
    lines = ['#include "cuda/attention_fwd.cuh"', '#include "cuda/attention_bwd.cuh"', '#include "cuda/scores.cu"',
             "#include <cstdio>", "int main() {"]
    for i, k in enumerate(keys):
        th, sm, launched = exprs[k]
        flags = " ".join("%d" for _ in launched)
        lines.append(f'  std::printf("%d %d %d {flags}\\n", {i}, int({th}), int({sm}), '
                     + ", ".join(f"int({e})" for e in launched.values()) + ");")
    lines.append("  return 0;\n}")
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp) / "traits.cu", Path(tmp) / "traits"
        src.write_text("\n".join(lines))
        subprocess.run(["nvcc", "-std=c++17", "--expt-relaxed-constexpr", "-arch=sm_90", f"-I{REPO / 'csrc'}", str(src),
                        "-o", str(exe)],
                       check=True, capture_output=True)
        out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    vals = {}
    for line in out.splitlines():
        i, th, sm, *launched = map(int, line.split())
        vals[keys[i]] = (th, None if sm < 0 else sm, dict(zip(ARCHS, map(bool, launched))))
    return vals


def profile_ours(archs: list[str], sources: list[Path] | None = None) -> list[dict]:
    """One row per (kernel, arch) of `sources` (default: every CUDA source of csrc/SOURCES)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        per_arch = {}
        for arch in archs:
            for src in [Path(s).resolve() for s in (sources or cuda_sources())]:
                cubin = Path(tmp) / f"{src.stem}.{arch}.cubin"
                info = compile_cubin(src, arch, cubin)
                per_arch.setdefault(arch, []).append((src, info, sass_functions(cubin)))
        names = sorted({n for items in per_arch.values() for _, info, _ in items for n in info})
        dem = demangle(names)
        parsed = {n: base_and_args(dem[n]) for n in names}
        traits = traits_values({(b, tuple(a)) for b, a in parsed.values()})
        for arch, items in per_arch.items():
            for src, info, funcs in items:
                for name, ptx in info.items():
                    base, args = parsed[name]
                    threads, smem, launched = traits.get((base, tuple(args)), (None, None, {}))
                    loop = main_loop(funcs.get(name, []))
                    row = dict(kernel=dem[name], base=base, args=args, source=str(src.relative_to(REPO)), arch=arch,
                               launched_on_arch=launched.get(arch, True), threads=threads, dynamic_smem=smem, **ptx,
                               occupancy=occupancy(arch, ptx["registers"], threads or 128,
                                                   (smem or 0) + ptx["static_smem"]) if threads else None,
                               main_loop=loop)
                    if loop and loop["HMMA"]:
                        row["estimate"] = estimate(loop)
                    rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# FlashAttention-2's record

def record_fa2(fwd: Path, bwd: Path, flags: str, ptxas_logs: list[Path]) -> dict:
    """Profiles FA2's cubins (built for sm_90 from the flash-attn sdist) into FA2_RECORD."""
    rec = dict(what="FlashAttention-2 hdim 128 fp16 forward and backward, static profile", arch="sm_90",
               build=flags, date=datetime.date.today().isoformat(),
               labels="forward <kBlockM>x<kBlockN> w<warps>, flags = Is_dropout Is_causal Is_local Has_alibi "
                      "Is_even_MN Is_even_K Is_softcap Return_softmax; backward flags = Is_dropout Is_causal "
                      "Has_alibi Is_even_MN Is_even_K Is_softcap. On sm_90 FA2 launches forward 128x64 (both causal "
                      "and not) and backward 64x128 (Flash_bwd_kernel_traits<128, 64, 128, 8, 2, 4, 2>).",
               kernels=[])
    ptxas = {}
    for log in ptxas_logs:
        ptxas.update(parse_ptxas(log.read_text()))
    for kind, cubin in (("forward", fwd), ("backward", bwd)):
        funcs = sass_functions(cubin)
        dem = demangle(list(funcs))
        for name, code in funcs.items():
            loop = main_loop(code)
            if not loop or not loop["HMMA"]:
                continue
            p = ptxas.get(name, {})
            _, targs = base_and_args(dem[name])
            tile = re.search(r"traits<(\d+), (\d+), (\d+), (\d+)", targs[0]) if targs else None
            flags = "".join("1" if a == "true" else "0" for a in targs[1:])
            label = f"{kind} {tile.group(2)}x{tile.group(3)} w{tile.group(4)} flags {flags}" if tile else kind
            rec["kernels"].append(dict(kind=kind, label=label, kernel=dem[name][:400], **p, main_loop=loop,
                                       estimate=estimate(loop)))
    FA2_RECORD.write_text(json.dumps(rec, indent=1))
    return rec


# ----------------------------------------------------------------------------------------------
# report

def short(row: dict) -> str:
    a = row["args"]
    return f"{row['base'].replace('_kernel', '')}<{','.join(x.replace('__nv_bfloat16', 'bf16').replace('__half', 'fp16') for x in a)}>"


def print_table(rows: list[dict], fa2: dict | None) -> None:
    hdr = (f"{'kernel':<44} {'arch':<6} {'regs':>4} {'spill':>5} {'smem KB':>7} {'blk/SM':>6} {'HMMA':>5} "
           f"{'LDSM':>4} {'LDS':>4} {'STS':>4} {'STSM':>4} {'LDGSTS':>6} {'BAR':>3} {'SHFL':>4} {'MUFU':>4} "
           f"{'smem/HMMA':>9} {'inner':>5}  estimate " + " / ".join(n.split()[0] for n in MACHINES)
           + " (TFLOP/s, bound)")
    print(hdr)
    print("-" * len(hdr))

    def line(label, arch, regs, spill, smem, occ, loop, est):
        hm = loop["HMMA"] if loop else 0
        sm_ins = sum(loop.get(c, 0) for c in SHARED) if loop else 0
        ratio = f"{sm_ins / hm:.2f}" if hm else "-"
        e = " / ".join(f"{v['est_tflops']:.0f} {v['bound'][:6]}" for v in est.values()) if est else ""
        cols = [loop.get(c, 0) if loop else "-" for c in ("HMMA", "LDSM", "LDS", "STS", "STSM", "LDGSTS", "BAR", "SHFL", "MUFU")]
        print(f"{label:<44} {arch:<6} {regs:>4} {spill:>5} {smem:>7} {occ:>6} {cols[0]:>5} {cols[1]:>4} {cols[2]:>4} "
              f"{cols[3]:>4} {cols[4]:>4} {cols[5]:>6} {cols[6]:>3} {cols[7]:>4} {cols[8]:>4} {ratio:>9} "
              f"{(loop['inner_loops'] if loop else '-'):>5}  {e}")

    for r in rows:
        if not r["launched_on_arch"]:
            continue  # an instantiation the host never launches on this architecture (kept in the JSON)
        smem = "dyn" if r["dynamic_smem"] is None else f"{(r['dynamic_smem'] + r['static_smem']) / 1024:.1f}"
        occ = r["occupancy"]["blocks_per_sm"] if r["occupancy"] else "-"
        line(short(r), r["arch"], r["registers"], r["spill_stores"] + r["spill_loads"], smem, occ, r["main_loop"],
             r.get("estimate"))
    if fa2:
        print(f"\nFlashAttention-2 (recorded {fa2['date']}, {fa2['arch']}; {FA2_RECORD.relative_to(REPO)}):")
        for k in fa2["kernels"]:
            line(f"FA2 {k.get('label', k['kind'])}", fa2["arch"], k.get("registers", 0),
                 k.get("spill_stores", 0) + k.get("spill_loads", 0), "-", "-", k["main_loop"], k["estimate"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    ap.add_argument("--json", type=Path, help="write the profile here (default: bench/results/kernel_profile_<date>.json)")
    ap.add_argument("--no-json", action="store_true")
    ap.add_argument("--record-fa2", nargs=2, type=Path, metavar=("FWD_CUBIN", "BWD_CUBIN"))
    ap.add_argument("--fa2-flags", default="", help="how the FA2 cubins were built (stored in the record)")
    ap.add_argument("--fa2-ptxas", nargs="*", type=Path, default=[], help="ptxas -v logs of the FA2 builds")
    args = ap.parse_args()
    if args.record_fa2:
        rec = record_fa2(*args.record_fa2, args.fa2_flags, args.fa2_ptxas)
        print(f"wrote {FA2_RECORD} ({len(rec['kernels'])} kernels)")
        return
    rows = profile_ours(args.arch)
    fa2 = json.loads(FA2_RECORD.read_text()) if FA2_RECORD.exists() else None
    print_table(rows, fa2)
    if not args.no_json:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = args.json or RESULTS / f"kernel_profile_{stamp}.json"
        nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
        path.write_text(json.dumps(dict(date=stamp, nvcc=nvcc, command=" ".join(sys.argv), machines=MACHINES,
                                        archs=ARCHS, kernels=rows, fa2=fa2), indent=1))
        print(f"\nwrote {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")


if __name__ == "__main__":
    main()
