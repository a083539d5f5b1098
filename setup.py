"""Builds atp_ops._C against the torch installed in the target environment.

Environment switches:
  ATP_OPS_FORCE_CPU=1     build the CPU kernels only, even when torch and nvcc support CUDA
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;8.6;9.0": Ampere and Hopper)
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               toolkit root; otherwise found from `nvcc --dryrun`, which sees
                          through wrapper scripts on PATH
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _import_torch():
    """Import the torch the extension will run against.

    Under pip's build isolation the build environment has no torch, and installing one there
    would compile against a torch other than the one the user runs. Instead we locate the
    target environment's site-packages (same interpreter, isolation variables removed) and
    import torch from there, so the extension always matches the installed torch.
    """
    try:
        import torch  # noqa: F401

        return torch
    except ImportError:
        pass
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONNOUSERBASE")}
    probe = "import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))"
    try:
        site = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()[-1]
    except (subprocess.CalledProcessError, IndexError):
        sys.exit("atp_ops: torch is not installed in this environment. Install it first "
                 "(pip install torch), then pip install . (or pip install --no-build-isolation .).")
    sys.path.append(site)
    import torch

    return torch


def _cuda_toolkit_root():
    """Toolkit root from CUDA_HOME, else from what `nvcc --dryrun` reports as TOP.

    nvcc on PATH may be a wrapper script in /usr/local/bin; the dirname of its path would
    then be wrong, but the real driver prints its own location in the dry run.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and (Path(os.environ[var]) / "bin" / "nvcc").exists():
            return str(Path(os.environ[var]).resolve())
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", os.devnull], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    if not m:
        return None
    root = Path(m.group(1).strip()).resolve()
    return str(root) if (root / "bin" / "nvcc").exists() else None


def _sources():
    """Read csrc/SOURCES: the one source list, shared with CMakeLists.txt."""
    groups, current = {"cpu": [], "cuda": []}, None
    for line in (ROOT / "csrc" / "SOURCES").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            continue
        groups[current].append(line)
    return groups


def _extension():
    torch = _import_torch()
    cuda_root = _cuda_toolkit_root()
    force_cpu = os.environ.get("ATP_OPS_FORCE_CPU", "0") not in ("", "0")
    with_cuda = torch.version.cuda is not None and cuda_root is not None and not force_cpu
    if with_cuda:
        os.environ["CUDA_HOME"] = cuda_root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
    import torch.utils.cpp_extension as cpp

    if with_cuda:
        cpp.CUDA_HOME = cuda_root  # the module may have guessed before we set the variable
    groups = _sources()
    sources = groups["cpu"] + (groups["cuda"] if with_cuda else [])
    cxx = ["-O3", "-fvisibility=hidden"]
    # at::parallel_for is inline OpenMP (torch's CPU builds use it): without -fopenmp every CPU
    # kernel would run on one thread. The runtime is the libgomp torch already loaded.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    cxx += openmp
    define = [("ATP_OPS_WITH_CUDA", "1")] if with_cuda else []
    kwargs = dict(
        name="atp_ops._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define,
        extra_link_args=openmp,
        py_limited_api=False,
    )
    if with_cuda:
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
        ext = cpp.CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    else:
        ext = cpp.CppExtension(extra_compile_args={"cxx": cxx}, **kwargs)
    print(f"atp_ops: building {'CPU+CUDA (' + cuda_root + ', arch ' + os.environ['TORCH_CUDA_ARCH_LIST'] + ')' if with_cuda else 'CPU only'}"
          f" against torch {torch.__version__}", file=sys.stderr)
    return ext, cpp.BuildExtension.with_options(use_ninja=True)


ext, build_ext = _extension()

setup(
    name="atp_ops",
    version="0.1.0",
    description="Fused attention with learnable per-key soft masks and ATP token-pruning scores",
    packages=find_packages(include=["atp_ops", "atp_ops.*"]) + find_packages("python"),
    package_dir={"atp_llava": "python/atp_llava"},
    package_data={"atp_llava": ["zero3.json"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.9",
    install_requires=["torch", "numpy"],
    extras_require={"llava": ["transformers>=5.24,<6", "safetensors", "tqdm"], "flash": ["flash-attn"],
                    # atp_llava.trainer: Hugging Face Trainer (which needs accelerate)
                    "trainer": ["transformers>=5.24,<6", "accelerate>=1.1", "safetensors", "tqdm"],
                    # ATPTrainer on DeepSpeed ZeRO-3 (atp_llava/zero3.json)
                    "deepspeed": ["deepspeed>=0.16", "transformers>=5.24,<6", "accelerate>=1.1", "safetensors",
                                  "tqdm"],
                    "test": ["pytest", "hypothesis"],
                    # bench/adaptivity.py's PNG plots
                    "bench": ["matplotlib"],
                    # lmms-eval plugin (python/atp_llava/lmms_eval_model.py): --model atp_llava. lmms-eval
                    # 0.7.3's evaluator imports filelock._api, which filelock 4 no longer has.
                    "lmms": ["lmms-eval>=0.7,<0.8", "filelock<4", "transformers>=5.24,<6", "safetensors", "tqdm",
                             "pillow"]},
    # lmms-eval 0.7 discovers external models through this entry-point group (ModelManifest payload)
    entry_points={"lmms_eval.models": ["atp_llava = atp_llava.lmms_eval_model:lmms_eval_manifest"]},
)
