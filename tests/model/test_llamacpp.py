"""The llama.cpp build: never native, one instruction-set tier chosen from the CPU's flags, cached under a key of
everything that changes the binaries, and the binaries run on this machine."""

import subprocess

from palmkit.model.llamacpp import (
    SDIST_SHA256,
    TARGETS,
    TIER_FLAGS,
    build_key,
    build_options,
    cpu_tier,
)

ZEN4 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl",
        "avx512_vnni", "avx512_bf16", "avx512vbmi"}


def test_tier_follows_the_flags():
    assert cpu_tier(ZEN4) == "avx512"
    assert cpu_tier(ZEN4 | {"amx_tile", "amx_int8", "amx_bf16"}) == "avx512"  # Sapphire Rapids: the same build
    assert cpu_tier(ZEN4 - {"avx512_bf16"}) == "avx2"  # Skylake-X has AVX512 but no BF16
    assert cpu_tier({"avx", "avx2", "fma", "f16c"}) == "generic"  # no BMI2
    assert cpu_tier(set()) == "generic"


def test_builds_are_never_native_and_never_amx():
    for tier in TIER_FLAGS:
        options = build_options(tier)
        assert options["GGML_NATIVE"] == "OFF"
        assert {options[k] for k in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")} == {"OFF"}
    assert build_options("avx2")["GGML_AVX512"] == "OFF" and build_options("avx512")["GGML_AVX512_BF16"] == "ON"


def test_key_changes_with_the_options():
    keys = {build_key(build_options(t)) for t in TIER_FLAGS}
    assert len(keys) == len(TIER_FLAGS)
    assert build_key(build_options("avx2")) != build_key({**build_options("avx2"), "GGML_OPENMP": "OFF"})


def test_cached_build_runs_here(llama_cpp):
    options = (llama_cpp.parent / "options.txt").read_text()
    assert SDIST_SHA256 in options and "-DGGML_NATIVE=OFF" in options
    assert llama_cpp.parent.name == build_key(build_options())  # this CPU's tier
    for target in TARGETS:
        run = subprocess.run([str(llama_cpp / target), "--help"], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0 or "usage" in (run.stdout + run.stderr).lower(), (target, run.stderr[-500:])
