"""Tests of the build machinery (build_config.py, bsattn/_loader.py) and of the built op library.

The build_config tests use tiny TF-free sources and a fake nvcc, so they take about a second.
The `ops`-marked tests check the library that is actually installed (or $BSATTN_OPS_LIBRARY):
CI runs them for the pip-built and for the Bazel-built library. They never skip: no library is a failure.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import_build_config():
    spec = importlib.util.spec_from_file_location("build_config", ROOT / "build_config.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_config"] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


bc = _import_build_config()
from bsattn import _loader


def _touch(path: Path, text: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def registered_op_names() -> list[str]:
    names = []
    for src in sorted((ROOT / "ops" / "cc" / "ops").glob("*.cc")):
        names += re.findall(r'REGISTER_OP\(\s*"(\w+)"\s*\)', src.read_text())
    return names


# --------------------------------------------------------------------------- build_config units


def test_discover_sources_sorted(tmp_path):
    for rel in ["ops/cc/ops/b.cc", "ops/cc/ops/a.cc", "ops/cc/kernels/k.cc", "ops/cc/kernels/k.h",
                "ops/cuda/z.cu", "ops/cuda/a.cu", "ops/cuda/launch.cuh", "ops/cuda/notes.txt", "ops/x.cu.cc.bak"]:
        _touch(tmp_path / rel)
    src = bc.discover_sources(tmp_path)
    rel = lambda ps: [p.relative_to(tmp_path).as_posix() for p in ps]
    assert rel(src.cc) == ["ops/cc/kernels/k.cc", "ops/cc/ops/a.cc", "ops/cc/ops/b.cc"]
    assert rel(src.cu) == ["ops/cuda/a.cu", "ops/cuda/z.cu"]
    assert rel(src.headers) == ["ops/cc/kernels/k.h", "ops/cuda/launch.cuh"]


def test_repository_sources_found():
    src = bc.discover_sources()
    assert src.cc, "no ops/cc/**/*.cc found"
    registering = {p.name for p in (ROOT / "ops/cc/ops").glob("*.cc")}
    assert registering <= {p.name for p in src.cc}


@pytest.mark.parametrize("value,mode", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("0", "0"), ("1", "1")])
def test_cuda_mode(value, mode):
    assert bc.cuda_mode({} if value is None else {"BSATTN_CUDA": value}) == mode


def test_cuda_mode_rejects_garbage():
    with pytest.raises(bc.BuildError, match="BSATTN_CUDA"):
        bc.cuda_mode({"BSATTN_CUDA": "yes"})


def _fake_cuda_home(tmp_path: Path) -> Path:
    """A toolkit whose "nvcc" compiles .cu files as C++ with g++ (enough to exercise the CUDA build path)."""
    home = tmp_path / "fakecuda"
    nvcc = _touch(home / "bin" / "nvcc", """#!/bin/sh
# fake nvcc: keep -c SRC -o OBJ, -I...; ignore the nvcc-only flags
args=""; while [ $# -gt 0 ]; do
  case "$1" in
    -o) args="$args -o $2"; shift;;
    -I*|*.cu) args="$args $1";;
    --version) echo "Cuda compilation tools, release 99.1, V99.1.0"; exit 0;;
  esac; shift; done
exec g++ -c -fPIC -x c++ $args
""")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    lib = home / "lib64"
    lib.mkdir()
    subprocess.run(["ar", "rcs", str(lib / "libcudart_static.a")], check=True)  # empty archive
    return home


def test_find_cuda_from_cuda_home(tmp_path):
    home = _fake_cuda_home(tmp_path)
    tk = bc.find_cuda({"CUDA_HOME": str(home), "PATH": ""}, default_homes=())
    assert tk == bc.CudaToolkit(home / "bin" / "nvcc", home / "lib64" / "libcudart_static.a")


def test_find_cuda_from_path(tmp_path):
    home = _fake_cuda_home(tmp_path)
    tk = bc.find_cuda({"PATH": str(home / "bin")}, default_homes=())
    assert tk is not None and tk.cudart_static == home / "lib64" / "libcudart_static.a"


def test_find_cuda_needs_cudart(tmp_path):
    home = _fake_cuda_home(tmp_path)
    (home / "lib64" / "libcudart_static.a").unlink()
    assert bc.find_cuda({"CUDA_HOME": str(home), "PATH": ""}, default_homes=()) is None


def test_resolve_cuda_modes(tmp_path):
    home = _fake_cuda_home(tmp_path)
    _touch(tmp_path / "ops/cc/ops/a.cc")
    cpu_only = bc.discover_sources(tmp_path)
    _touch(tmp_path / "ops/cuda/k.cu")
    with_cu = bc.discover_sources(tmp_path)
    found = {"CUDA_HOME": str(home), "PATH": ""}
    missing = {"PATH": ""}
    assert bc.resolve_cuda(with_cu, found, default_homes=()) is not None
    assert bc.resolve_cuda(with_cu, {**found, "BSATTN_CUDA": "0"}, default_homes=()) is None
    assert bc.resolve_cuda(cpu_only, found, default_homes=()) is None  # no .cu: nothing to link
    assert bc.resolve_cuda(with_cu, missing, default_homes=()) is None  # auto: CPU-only
    with pytest.raises(bc.BuildError, match="BSATTN_CUDA=1"):
        bc.resolve_cuda(with_cu, {**missing, "BSATTN_CUDA": "1"}, default_homes=())


FAKE_TF = bc.TFInfo("0.0-test", "/nonexistent", "/nonexistent", ("--std=c++17",), ())


def test_command_flags_and_link_order(tmp_path):
    tk = bc.CudaToolkit(Path("/cuda/bin/nvcc"), Path("/cuda/lib64/libcudart_static.a"))
    tf = bc.TFInfo("x", "/tf/include", "/tf", ("-I/tf/include", "--std=c++17"), ("-L/tf", "-l:libtensorflow_framework.so.2"))
    cpu = bc.cxx_compile_cmd(Path("a.cc"), Path("a.o"), tf, cuda=False)
    gpu = bc.cxx_compile_cmd(Path("a.cc"), Path("a.o"), tf, cuda=True)
    assert "-DGOOGLE_CUDA=1" not in cpu and "-DGOOGLE_CUDA=1" in gpu
    assert {"-O3", "-fPIC", "-Wno-deprecated-declarations", "-Wno-interference-size", "-I/tf/include"} <= set(cpu)
    nvcc = bc.nvcc_compile_cmd(Path("k.cu"), Path("k.o"), tk)
    assert nvcc[0] == "/cuda/bin/nvcc" and "-gencode=arch=compute_90a,code=sm_90a" in nvcc
    assert "--expt-relaxed-constexpr" in nvcc and "-fPIC" in nvcc
    link = bc.link_cmd([Path("a.o")], [Path("k.o")], Path("out.so"), tf, tk)
    tf_at = link.index("-l:libtensorflow_framework.so.2")
    # the trap: CUDA objects and the static cudart must come before TF's library (it exports cuda*)
    assert link.index("k.o") < link.index(str(tk.cudart_static)) < link.index("-lpthread") < tf_at
    assert link[-1] == "-Wl,--no-undefined"
    assert str(tk.cudart_static) not in bc.link_cmd([Path("a.o")], [], Path("o.so"), tf, None)


def test_undefined_cuda_symbols_detected(tmp_path):
    src = _touch(tmp_path / "u.cc", 'extern "C" int cudaGetLastError(); int f() { return cudaGetLastError(); }\n')
    lib = tmp_path / "u.so"
    subprocess.run(["g++", "-shared", "-fPIC", str(src), "-o", str(lib)], check=True)
    assert bc.undefined_cuda_symbols(lib) == ["cudaGetLastError"]


def _mini_tree(root: Path) -> None:
    _touch(root / "ops/cc/ops/a.cc", '#include "ops/cc/kernels/k.h"\nint a() { return K; }\n')
    _touch(root / "ops/cc/kernels/k.h", "#define K 1\n")
    _touch(root / "ops/cc/kernels/b.cc",
           '#if GOOGLE_CUDA\nextern "C" int launch();\nint b() { return launch(); }\n#endif\n')


def test_build_library_incremental(tmp_path):
    _mini_tree(tmp_path)
    out = tmp_path / "pkg" / bc.LIB_NAME
    build = lambda **kw: bc.build_library(out, root=tmp_path, tf=FAKE_TF, env={"BSATTN_CUDA": "0"}, **kw)
    first = build()
    assert out.is_file() and len(first.compiled) == 2 and first.linked
    info = json.loads((out.parent / bc.BUILD_INFO_NAME).read_text())
    assert info["tf_version"] == "0.0-test" and info["cuda"] is False and info["cuda_archs"] == []
    second = build()
    assert second.compiled == [] and not second.linked
    time.sleep(0.01)
    os.utime(tmp_path / "ops/cc/kernels/k.h")  # a header change recompiles everything
    assert len(build().compiled) == 2
    time.sleep(0.01)
    os.utime(tmp_path / "ops/cc/ops/a.cc")
    third = build()
    assert [p.name for p in third.compiled] == ["a.cc"] and third.linked
    (tmp_path / "ops/cc/kernels/b.cc").unlink()  # a deleted source must leave the library
    fourth = build()
    assert fourth.compiled == [] and fourth.linked and fourth.build_info["sources"] == ["ops/cc/ops/a.cc"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_build_library_cuda_path_with_fake_nvcc(tmp_path):
    _mini_tree(tmp_path)
    _touch(tmp_path / "ops/cuda/k.cu", 'extern "C" int launch() { return 7; }\n')
    home = _fake_cuda_home(tmp_path)
    out = tmp_path / "pkg" / bc.LIB_NAME
    env = {"CUDA_HOME": str(home), "PATH": os.environ.get("PATH", "")}
    res = bc.build_library(out, root=tmp_path, tf=FAKE_TF, env=env)
    assert res.build_info["cuda"] is True and res.build_info["nvcc_version"] == "99.1"
    assert {p.name for p in res.compiled} == {"a.cc", "b.cc", "k.cu"}
    assert "launch" in subprocess.run(["nm", "-D", "--defined-only", str(out)], check=False, capture_output=True, text=True).stdout
    # Back to CPU-only: other objects (no GOOGLE_CUDA), and the library is relinked without the kernels.
    cpu = bc.build_library(out, root=tmp_path, tf=FAKE_TF, env={**env, "BSATTN_CUDA": "0"})
    assert cpu.build_info["cuda"] is False and cpu.linked
    assert "launch" not in subprocess.run(["nm", "-D", str(out)], check=False, capture_output=True, text=True).stdout


def test_pip_build_tells_the_terminal_cuda_first_all_cores(tmp_path, monkeypatch):
    """Under pip (which hides a build's output) the first and last lines also go to the terminal; the .cu
    files start first; the default job count is the number of cores."""
    _mini_tree(tmp_path)
    _touch(tmp_path / "ops/cuda/k.cu", 'extern "C" int launch() { return 7; }\n')
    env = {"CUDA_HOME": str(_fake_cuda_home(tmp_path)), "PATH": os.environ.get("PATH", "")}
    terminal = tmp_path / "tty"
    monkeypatch.setattr(bc, "TERMINAL", str(terminal))
    monkeypatch.setattr(bc.sys, "stderr", io.StringIO())  # not a terminal, as under pip
    started = []
    real_run = bc._run
    monkeypatch.setattr(bc, "_run", lambda cmd, *a, **k: started.append(cmd[0]) or real_run(cmd, *a, **k))
    res = bc.build_library(tmp_path / "pkg" / bc.LIB_NAME, root=tmp_path, tf=FAKE_TF, env=env, builder="pip", jobs=1)
    assert started[0].endswith("nvcc") and res.build_info["cuda_archs"] == ["sm_80", "sm_90a"]
    lines = terminal.read_text().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("[bsattn] building the op library: 2 C++ files and 1 CUDA files (nvcc, sm_80, sm_90a")
    assert "BSATTN_CUDA=0" in lines[0] and "3 compiled, linked" in lines[1]
    assert "building the op library" in bc.sys.stderr.getvalue()  # stderr keeps everything (pip -v)
    terminal.unlink()
    bc.build_library(tmp_path / "pkg" / bc.LIB_NAME, root=tmp_path, tf=FAKE_TF, env=env, builder="pip")
    assert not terminal.exists()  # nothing to do: nothing on the terminal
    monkeypatch.delenv("BSATTN_JOBS", raising=False)
    assert bc.default_jobs() == os.cpu_count()
    monkeypatch.setenv("BSATTN_JOBS", "3")
    assert bc.default_jobs() == 3


def test_cuda_archs_are_sass_only_and_shared_with_bazel(monkeypatch):
    """sm_80 and sm_90a cubins, no PTX; configure.py's .bazelrc passes the same list and flags to Bazel."""
    assert bc.GENCODE_FLAGS == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]
    tk = bc.CudaToolkit(Path("/cuda/bin/nvcc"), Path("/cuda/lib64/libcudart_static.a"))
    monkeypatch.setattr(bc, "tf_info", lambda python: FAKE_TF)
    monkeypatch.setattr(bc, "find_cuda", lambda env: tk)
    rc = bc.bazelrc_text("python", env={})
    assert "--repo_env=BSATTN_CUDA_ARCHS='sm_80 sm_90a'" in rc
    flags = re.search(r"--repo_env=BSATTN_NVCC_FLAGS='([^']*)'", rc).group(1).split()
    assert flags == bc.NVCC_FLAGS and not any("code=compute_" in f for f in flags)


def test_build_library_reports_compile_errors(tmp_path):
    _touch(tmp_path / "ops/cc/ops/bad.cc", "this is not C++\n")
    with pytest.raises(bc.BuildError, match="compiling ops/cc/ops/bad.cc"):
        bc.build_library(tmp_path / bc.LIB_NAME, root=tmp_path, tf=FAKE_TF, env={"BSATTN_CUDA": "0"})


def test_bazel_files_consistent():
    """ops/BUILD globs the same sources as build_config, and nothing downloads."""
    build = (ROOT / "ops" / "BUILD").read_text()
    assert '"cc/**/*.cc"' in build and '"cuda/*.cu"' in build
    assert bc.CC_GLOB == "ops/cc/**/*.cc" and bc.CU_GLOB == "ops/cuda/*.cu"
    fetching = re.compile(r"http_archive|http_file|git_repository|\.download(_and_extract)?\(")
    for f in [ROOT / "WORKSPACE", *(ROOT / "third_party").rglob("*.bzl")]:
        assert not fetching.search(f.read_text()), f
    assert not (ROOT / ".bazelversion").exists() or "4.2.3" not in (ROOT / ".bazelversion").read_text()


# --------------------------------------------------------------------------- loader


def test_loader_missing_library(tmp_path, monkeypatch):
    monkeypatch.setenv(_loader.LIBRARY_ENV, str(tmp_path / "nope.so"))
    with pytest.raises(_loader.OpsLibraryError, match="pip install"):
        _loader._load()


def test_loader_tf_version_mismatch(tmp_path, monkeypatch):
    import tensorflow as tf

    lib = _touch(tmp_path / _loader.LIB_NAME, "not a library")
    _touch(tmp_path / _loader.BUILD_INFO_NAME, json.dumps({"tf_version": "1.2.3", "cuda": False}))
    monkeypatch.setenv(_loader.LIBRARY_ENV, str(lib))
    assert _loader.library_path() == lib.resolve() and _loader.build_info()["tf_version"] == "1.2.3"
    with pytest.raises(_loader.OpsLibraryError, match=rf"built for TensorFlow 1\.2\.3.*{re.escape(tf.__version__)}"):
        _loader._load()


# --------------------------------------------------------------------------- the built library


@pytest.mark.ops
def test_library_loads():
    assert _loader.library_path().is_file(), f"{_loader.library_path()} missing: pip install -e . first"
    assert _loader.load_ops() is _loader.load_ops()


@pytest.mark.ops
def test_build_info_matches_tensorflow():
    import tensorflow as tf

    info = _loader.build_info()
    assert info is not None, f"no {_loader.BUILD_INFO_NAME} next to {_loader.library_path()}"
    assert info["tf_version"] == tf.__version__
    assert info["cuda"] == bool(info["cuda_archs"])


@pytest.mark.ops
def test_every_registered_op_has_a_wrapper():
    from tensorflow.python.framework import op_def_registry

    names = registered_op_names()
    assert names, "no REGISTER_OP found in ops/cc/ops/*.cc"
    module = _loader.load_ops()
    wrappers = {a.replace("_", "").lower() for a in dir(module) if not a.startswith("_")}
    for name in names:
        assert op_def_registry.get(name) is not None, f"{name} not registered"
        assert name.lower() in wrappers, f"no wrapper for {name} in the loaded module"


@pytest.mark.ops
def test_no_undefined_cuda_symbols():
    # An undefined cuda* symbol would bind to TF's CUDA 12 stub instead of our static cudart.
    assert bc.undefined_cuda_symbols(_loader.library_path()) == []


@pytest.mark.ops
def test_cuda_code_present_iff_build_info_says_so():
    if shutil.which("readelf") is None:
        pytest.fail("readelf (binutils) is needed")
    sections = subprocess.run(["readelf", "-S", "-W", str(_loader.library_path())],
                              capture_output=True, text=True, check=True).stdout
    assert (".nv_fatbin" in sections) == _loader.build_info()["cuda"]


@pytest.mark.ops
@pytest.mark.parametrize("op", ["BsattnNt", "BsattnNn", "BsattnTn", "BsattnMaskedSoftmax", "BsattnMaskedSoftmaxGrad",
                                "BsattnFusedAttention", "BsattnFusedAttentionGrad"])
def test_gpu_kernels_registered_iff_cuda_build(op):
    # The TF GPU wrappers are compiled and registered exactly when the library was built with nvcc
    # (float32, float16 and bfloat16 each; Nn/Tn also float16/bfloat16 weights with float32
    # activations); the CPU kernels always are.
    from tensorflow.python.framework import kernels

    _loader.load_ops()
    devices = [k.device_type for k in kernels.get_registered_kernels_for_op(op).kernel]
    assert devices.count("CPU") >= 3
    per_dtype = 5 if op in ("BsattnNn", "BsattnTn") else 3
    assert devices.count("GPU") == (per_dtype if _loader.build_info()["cuda"] else 0)


@pytest.mark.parametrize("archs, expected", [("", ["sm_80", "sm_90a"]), ("sm_80", ["sm_80"]), ("sm_90a", ["sm_90a"]),
                                             ("sm_90a,sm_80", ["sm_80", "sm_90a"])])
def test_cuda_archs_from_the_environment(archs, expected):
    """$BSATTN_CUDA_ARCHS picks the cubins nvcc builds (CI's Bazel build: sm_80 only); an unknown one is an error."""
    code = "import build_config as b; print(' '.join(real for _, real in b.CUDA_ARCHS), len(b.GENCODE_FLAGS))"
    env = dict(os.environ, BSATTN_CUDA_ARCHS=archs)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == [*expected, str(len(expected))], done.stderr


def test_unknown_cuda_arch_is_an_error():
    env = dict(os.environ, BSATTN_CUDA_ARCHS="sm_70")
    done = subprocess.run([sys.executable, "-c", "import build_config"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "BSATTN_CUDA_ARCHS=sm_70: each must be one of ['sm_80', 'sm_90a']" in done.stderr
