"""llama.cpp built once from the pinned `llama-cpp-python` sdist: the reference runtime for palmkit's GGUF export.

    from palmkit.model.llamacpp import llama_cpp_bin
    bin_dir = llama_cpp_bin()                  # builds on the first call (~5 min on 2 cores), then a cached no-op
    server = bin_dir / "llama-server"          # also llama-cli, llama-bench, llama-perplexity, llama-tokenize

or from a shell (prints the bin directory, building it first if needed):

    python -m palmkit.model.llamacpp

The source is `vendor/llama.cpp` of `llama-cpp-python==0.3.36` from PyPI (fetched with `pip download`, checked
against its sha256), configured with cmake and built with ninja under `nice -n 19`. The result is cached under
`~/.cache/palmkit/llama.cpp/<key>/bin` (or `$PALMKIT_LLAMA_CPP_CACHE/<key>/bin`), where the key hashes the sdist's
sha256 and every cmake option, so a change to either builds afresh; a lock file makes concurrent callers (tests,
benchmarks) wait for one build instead of starting two.

CPU features. A `GGML_NATIVE=ON` build compiles for the building machine's every instruction (`-march=native`), so
binaries built, or cached, on a machine with AMX or AVX512-VBMI die with "illegal instruction" on one without. The
build here is never native: it names its instruction sets explicitly, and the set is a tier chosen from this CPU's
flags, which is part of the cache key:

- `avx512`: AVX, AVX2, FMA, F16C, BMI2, AVX512F/BW/DQ/VL + VNNI + BF16 (AMD Zen 4 and later, Intel Sapphire Rapids
  and later: every machine of this project). AMX stays off: the AMD machines lack it, and ggml's AMX path only
  speeds up a few quantised types on batches, not the q8_0/f16/bf16/f32 types palmkit exports;
- `avx2`: AVX, AVX2, FMA, F16C, BMI2 (any x86-64 machine of the last ten years);
- `generic`: no extra instruction sets (other architectures).

One tier is one build of ggml's CPU backend; ggml's `GGML_CPU_ALL_VARIANTS` (a dozen variants picked at run time)
would also be portable but multiplies the build's longest step by as many variants.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from palmkit.errors import PalmkitError

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS = ("llama-server", "llama-cli", "llama-bench", "llama-perplexity", "llama-tokenize")

# Options of every build: static binaries (a cached bin directory runs from anywhere), no tests or examples, nothing
# downloaded at build time (the server's web page would come from a Hugging Face bucket), no TLS.
BASE_OPTIONS = {
    "CMAKE_BUILD_TYPE": "Release",
    "BUILD_SHARED_LIBS": "OFF",
    "GGML_NATIVE": "OFF",
    "GGML_BACKEND_DL": "OFF",
    "GGML_OPENMP": "ON",
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
    "LLAMA_BUILD_TOOLS": "ON",
    "LLAMA_BUILD_SERVER": "ON",
    "LLAMA_BUILD_UI": "OFF",
    "LLAMA_USE_PREBUILT_UI": "OFF",
    "LLAMA_OPENSSL": "OFF",
    "LLAMA_CURL": "OFF",
    "GGML_AMX_TILE": "OFF",
    "GGML_AMX_INT8": "OFF",
    "GGML_AMX_BF16": "OFF",
}
_AVX2 = {"GGML_SSE42": "ON", "GGML_AVX": "ON", "GGML_AVX2": "ON", "GGML_FMA": "ON", "GGML_F16C": "ON",
         "GGML_BMI2": "ON"}
_NO_AVX512 = {"GGML_AVX512": "OFF", "GGML_AVX512_VBMI": "OFF", "GGML_AVX512_VNNI": "OFF", "GGML_AVX512_BF16": "OFF"}
TIERS = {
    "avx512": {**_AVX2, **_NO_AVX512, "GGML_AVX512": "ON", "GGML_AVX512_VNNI": "ON", "GGML_AVX512_BF16": "ON"},
    "avx2": {**_AVX2, **_NO_AVX512},
    "generic": {},
}
# /proc/cpuinfo flags each tier's instructions need (ggml's GGML_AVX512 compiles with avx512f/cd/vl/dq/bw)
TIER_FLAGS = {
    "avx512": {"avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
               "avx512_vnni",
               "avx512_bf16"},
    "avx2": {"avx", "avx2", "fma", "f16c", "bmi2"},
    "generic": set(),
}


def cpu_tier(flags: set[str] | None = None) -> str:
    """The widest instruction-set tier this CPU (or the given /proc/cpuinfo flags) runs."""
    if flags is None:
        flags = _cpu_flags()
    for tier in ("avx512", "avx2"):
        if TIER_FLAGS[tier] <= flags:
            return tier
    return "generic"


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def build_options(tier: str | None = None) -> dict[str, str]:
    """Every cmake option of the build for a tier (this CPU's by default)."""
    return {**BASE_OPTIONS, **TIERS[tier or cpu_tier()]}


def cache_root() -> Path:
    """Where builds are cached: $PALMKIT_LLAMA_CPP_CACHE, else ~/.cache/palmkit/llama.cpp."""
    env = os.environ.get("PALMKIT_LLAMA_CPP_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "palmkit" / "llama.cpp"


def build_key(options: dict[str, str]) -> str:
    """The cache key: the sdist's sha256 and every cmake option and target."""
    text = "\n".join([SDIST_SHA256, *(f"{k}={v}" for k, v in sorted(options.items())), *TARGETS])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def llama_cpp_bin(tier: str | None = None, quiet: bool = False) -> Path:
    """The bin directory of a cached llama.cpp build (llama-server, llama-cli, ...), building it first if needed."""
    options = build_options(tier)
    root = cache_root()
    out = root / build_key(options)
    bin_dir = out / "bin"
    if _complete(bin_dir):
        return bin_dir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same key: wait for it
        if _complete(bin_dir):
            return bin_dir
        _build(out, options, root, quiet)
    return bin_dir


def _complete(bin_dir: Path) -> bool:
    return all((bin_dir / t).is_file() for t in TARGETS) and (bin_dir.parent / "options.txt").is_file()


def _sdist(root: Path, quiet: bool) -> Path:
    """The pinned sdist, downloaded once with pip and checked against its sha256."""
    path = root / "sdist" / SDIST_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
              "-d", str(path.parent)], quiet)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise PalmkitError(f"{path} has sha256 {digest}, expected {SDIST_SHA256}: delete it to download again")
    return path


def _build(out: Path, options: dict[str, str], root: Path, quiet: bool) -> None:
    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            raise PalmkitError(f"building llama.cpp needs {tool} (Debian: apt-get install cmake ninja-build g++)")
    sdist = _sdist(root, quiet)
    with tempfile.TemporaryDirectory(dir=root, prefix="build-") as tmp:
        tmp = Path(tmp)
        prefix = SDIST_FILE.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(tmp, members=members, filter="data")
        src = tmp / prefix
        build = tmp / "build"
        nice = ["nice", "-n", "19"]
        _run([*nice, "cmake", "-S", str(src), "-B", str(build), "-G", "Ninja",
              *(f"-D{k}={v}" for k, v in options.items())], quiet)
        _run([*nice, "cmake", "--build", str(build), "--target", *TARGETS], quiet)
        staged = tmp / "out"
        (staged / "bin").mkdir(parents=True)
        for target in TARGETS:
            shutil.copy2(build / "bin" / target, staged / "bin" / target)
        (staged / "options.txt").write_text(
            f"{SDIST} sha256 {SDIST_SHA256}\n" + "".join(f"-D{k}={v}\n" for k, v in options.items()))
        if out.exists():  # an incomplete earlier build of this key (interrupted): this one replaces it
            shutil.rmtree(out)
        staged.rename(out)


def _run(cmd: list[str], quiet: bool) -> None:
    if not quiet:
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.STDOUT if quiet else None,
                          text=True)
    if proc.returncode != 0:
        tail = (proc.stdout or "")[-4000:] if quiet else ""
        raise PalmkitError(f"llama.cpp build step failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")


if __name__ == "__main__":
    print(llama_cpp_bin())
