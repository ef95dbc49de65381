#!/usr/bin/env python3
"""Single source of truth for building the bsattn op library.

Used by ``setup.py`` (pip), by ``configure.py`` (Bazel) and directly as the fast dev loop::

    python build_config.py            # builds bsattn/_bsattn_ops.so in place (incremental)
    python build_config.py --print-bazelrc
    python build_config.py --check-nm PATH

Every ``ops/cc/**/*.cc`` is compiled with g++ into one shared library. When at least one
``ops/cuda/*.cu`` exists, nvcc is found and ``BSATTN_CUDA`` is not ``0``, the ``.cu`` files are
compiled with nvcc, the ``.cc`` files get ``-DGOOGLE_CUDA=1``, and the CUDA objects plus the static
cudart are linked *before* libtensorflow_framework (which exports its own ``cuda*`` symbols).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent
LIB_NAME = "_bsattn_ops.so"
BUILD_INFO_NAME = "_build_info.json"  # written next to the library; read by bsattn/_loader.py
DEFAULT_OUT = ROOT / "bsattn" / LIB_NAME

CC_GLOB = "ops/cc/**/*.cc"
CU_GLOB = "ops/cuda/*.cu"
HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inc")

# TF/absl/Eigen headers print ~110 warnings per file without the first two (deprecated StrCat, Eigen
# RunQueue); -Wno-psabi silences GCC's "ABI for passing parameters with 32-byte alignment has changed" note.
WARNING_FLAGS = ["-Wno-deprecated-declarations", "-Wno-interference-size", "-Wno-psabi"]
CXX_FLAGS = ["-O3", "-fPIC", *WARNING_FLAGS]
# (virtual arch, real arch): SASS for A100 (sm_80, also run by sm_86/sm_89) and Hopper (sm_90a: wgmma/TMA).
# No compute_90 PTX: it would let newer GPUs (Blackwell) JIT the kernels, at a cost measured in the README
# (Install); add ("compute_90", "compute_90") here for that.
ALL_CUDA_ARCHS = [("compute_80", "sm_80"), ("compute_90a", "sm_90a")]


def _selected_cuda_archs() -> list[tuple[str, str]]:
    """ALL_CUDA_ARCHS, or the ones ``$BSATTN_CUDA_ARCHS`` names (space/comma separated real archs, e.g. ``sm_80``:
    CI's Bazel build compiles one, the pip build of the same run having compiled both)."""
    names = os.environ.get("BSATTN_CUDA_ARCHS", "").replace(",", " ").split()
    if not names:
        return list(ALL_CUDA_ARCHS)
    known = {real for _, real in ALL_CUDA_ARCHS}
    if not set(names) <= known:
        raise SystemExit(f"BSATTN_CUDA_ARCHS={' '.join(names)}: each must be one of {sorted(known)}")
    return [arch for arch in ALL_CUDA_ARCHS if arch[1] in names]


CUDA_ARCHS = _selected_cuda_archs()
GENCODE_FLAGS = [f"-gencode=arch={virt},code={real}" for virt, real in CUDA_ARCHS]
NVCC_FLAGS = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "--expt-relaxed-constexpr", *GENCODE_FLAGS]
CUDA_LINK_LIBS = ["-ldl", "-lrt", "-lpthread"]  # what libcudart_static.a needs
# The sanitizer build (CPU only, `--sanitize`, CI's sanitizer job): ASan + UBSan. GCC 12 with TF's headers
# needs the four -fno-sanitize checks off: TF/absl/Eigen headers trip null/nonnull/vptr checks in their own inline
# code (e.g. Eigen's nullptr-offset maps, protobuf's RTTI-less classes), which are not ours to fix.
SANITIZE_FLAGS = ["-fsanitize=address,undefined",
                  "-fno-sanitize=null,vptr,nonnull-attribute,returns-nonnull-attribute",
                  "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g1"]
SANITIZE_OUT = ROOT / "build" / "sanitize" / LIB_NAME
DEFAULT_CUDA_HOMES = (Path("/usr/local/cuda"),)

TERMINAL = "/dev/tty"  # the controlling terminal, which pip does not capture

_CUDA_SYMBOL = re.compile(r"_*cuda\w*")  # cudaGetLastError, __cudaRegisterFatBinary, ...


class BuildError(RuntimeError):
    """A build step failed; the message says which and why."""


def _log(msg: str, terminal: bool = False) -> None:
    """``msg`` on stderr; with ``terminal`` also on the controlling terminal when stderr is not one (pip hides
    a build's output unless -v, even without -q; /dev/tty still reaches the user's screen)."""
    print(f"[bsattn] {msg}", file=sys.stderr, flush=True)
    if terminal and not sys.stderr.isatty():
        try:
            with open(TERMINAL, "a") as tty:
                tty.write(f"[bsattn] {msg}\n")
        except OSError:  # no terminal (CI, a detached shell): stderr is all there is
            pass


# --------------------------------------------------------------------------- TensorFlow


@dataclasses.dataclass(frozen=True)
class TFInfo:
    version: str
    include_dir: str
    lib_dir: str
    compile_flags: tuple[str, ...]
    link_flags: tuple[str, ...]


_TF_QUERY = """
import json, os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
import tensorflow as tf
s = tf.sysconfig
print(json.dumps(dict(version=tf.__version__, include_dir=s.get_include(), lib_dir=s.get_lib(),
                      compile_flags=s.get_compile_flags(), link_flags=s.get_link_flags())))
"""


@functools.cache
def tf_info(python: str = sys.executable) -> TFInfo:
    """TF flags from ``python`` in a subprocess, so the build environment's TF is the one used."""
    proc = subprocess.run([python, "-c", _TF_QUERY], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"cannot import tensorflow with {python}:\n{proc.stderr[-3000:]}\n"
                         "Install it first: pip install tensorflow==2.21.0")
    data = json.loads(proc.stdout.strip().splitlines()[-1])  # last line: TF may print to stdout
    return TFInfo(data["version"], data["include_dir"], data["lib_dir"],
                  tuple(data["compile_flags"]), tuple(data["link_flags"]))


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class Sources:
    cc: tuple[Path, ...]
    cu: tuple[Path, ...]
    headers: tuple[Path, ...]


def discover_sources(root: Path = ROOT) -> Sources:
    """All sources, sorted, so builds are reproducible whatever the file system order."""
    root = Path(root)
    headers = sorted(p for p in (root / "ops").rglob("*") if p.suffix in HEADER_SUFFIXES and p.is_file())
    return Sources(cc=tuple(sorted(root.glob(CC_GLOB))), cu=tuple(sorted(root.glob(CU_GLOB))),
                   headers=tuple(headers))


# --------------------------------------------------------------------------- CUDA


@dataclasses.dataclass(frozen=True)
class CudaToolkit:
    nvcc: Path
    cudart_static: Path


def cuda_mode(env: Mapping[str, str] = os.environ) -> str:
    """``BSATTN_CUDA``: ``0`` (never), ``1`` (required), ``auto`` (default: when nvcc is found)."""
    mode = env.get("BSATTN_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("0", "1", "auto"):
        raise BuildError(f"BSATTN_CUDA must be 0, 1 or auto, not {mode!r}")
    return mode


def _find_cudart(home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (home / sub / "libcudart_static.a").is_file():
            return home / sub / "libcudart_static.a"
    return None


def find_cuda(env: Mapping[str, str] = os.environ,
              default_homes: Sequence[Path] = DEFAULT_CUDA_HOMES) -> CudaToolkit | None:
    """nvcc + libcudart_static.a from ``$CUDA_HOME``, then /usr/local/cuda, then ``nvcc`` on PATH."""
    homes = [Path(env["CUDA_HOME"])] if env.get("CUDA_HOME") else []
    homes += list(default_homes)
    for home in homes:
        nvcc, cudart = home / "bin" / "nvcc", _find_cudart(home)
        if nvcc.is_file() and os.access(nvcc, os.X_OK) and cudart:
            return CudaToolkit(nvcc, cudart)
    on_path = shutil.which("nvcc", path=env.get("PATH", os.defpath))
    if on_path:
        home = _nvcc_top(on_path) or Path(on_path).resolve().parent.parent
        if cudart := _find_cudart(home):
            return CudaToolkit(Path(on_path), cudart)
    return None


def _nvcc_top(nvcc: str) -> Path | None:
    """The toolkit root nvcc itself uses (works for wrapper scripts such as /usr/local/bin/nvcc)."""
    try:
        proc = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              check=False, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"^#\$ TOP=(.*)$", proc.stdout + proc.stderr, re.MULTILINE)
    return Path(m.group(1).strip()).resolve() if m else None


def resolve_cuda(sources: Sources, env: Mapping[str, str] = os.environ,
                 default_homes: Sequence[Path] = DEFAULT_CUDA_HOMES) -> CudaToolkit | None:
    """The toolkit to build with, or None for a CPU-only build."""
    mode = cuda_mode(env)
    if mode == "0":
        return None
    toolkit = find_cuda(env, default_homes)
    if mode == "1" and toolkit is None:
        raise BuildError("BSATTN_CUDA=1 but no CUDA toolkit was found (need bin/nvcc and libcudart_static.a "
                         "under $CUDA_HOME, /usr/local/cuda or the nvcc on PATH). Set CUDA_HOME, or "
                         "BSATTN_CUDA=0 for a CPU-only build.")
    if not sources.cu:
        if mode == "1":
            _log("BSATTN_CUDA=1 but ops/cuda has no .cu files: building CPU-only")
        return None
    return toolkit


def nvcc_version(nvcc: Path) -> str:
    out = subprocess.run([str(nvcc), "--version"], check=False, capture_output=True, text=True).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


# --------------------------------------------------------------------------- commands


def cxx() -> str:
    return os.environ.get("CXX", "g++")


def cxx_compile_cmd(src: Path, obj: Path, tf: TFInfo, cuda: bool, root: Path = ROOT,
                    sanitize: bool = False) -> list[str]:
    defines = ["-DGOOGLE_CUDA=1"] if cuda else []
    extra = SANITIZE_FLAGS if sanitize else []
    # -I root: sources may include "ops/cc/..." or "ops/cuda/..." headers, as under Bazel.
    return [cxx(), "-c", *CXX_FLAGS, *extra, *defines, *tf.compile_flags, f"-I{root}", str(src), "-o", str(obj)]


def nvcc_compile_cmd(src: Path, obj: Path, toolkit: CudaToolkit, root: Path = ROOT) -> list[str]:
    return [str(toolkit.nvcc), "-c", *NVCC_FLAGS, f"-I{root}", str(src), "-o", str(obj)]


def link_cmd(objs: Sequence[Path], cu_objs: Sequence[Path], out: Path, tf: TFInfo,
             toolkit: CudaToolkit | None, sanitize: bool = False) -> list[str]:
    cuda_part: list[str] = []
    if toolkit:
        cuda_part = [*map(str, cu_objs), str(toolkit.cudart_static), *CUDA_LINK_LIBS]
    # ORDER MATTERS: libtensorflow_framework.so.2 exports cuda* (TF's CUDA 12 stub); anything after it
    # would bind our nvcc-13 kernels to that stub. So CUDA objects + static cudart come first.
    # A sanitized library leaves the runtimes' symbols to the LD_PRELOADed libasan/libubsan.
    tail = SANITIZE_FLAGS[:1] if sanitize else ["-Wl,--no-undefined"]
    return [cxx(), "-shared", "-o", str(out), *map(str, objs), *cuda_part, *tf.link_flags, *tail]


def undefined_cuda_symbols(lib: Path) -> list[str]:
    """Undefined dynamic symbols that look like CUDA runtime ones (must be none: see link_cmd)."""
    proc = subprocess.run(["nm", "-D", "--undefined-only", str(lib)], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"nm failed on {lib}: {proc.stderr}")
    return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()
            and _CUDA_SYMBOL.fullmatch(line.split()[-1].split("@")[0])]


# --------------------------------------------------------------------------- build


@dataclasses.dataclass
class BuildResult:
    library: Path
    build_info: dict
    compiled: list[Path]
    linked: bool
    seconds: float


def _run(cmd: Sequence[str], verbose: bool, what: str, rename: tuple[Path, Path] | None = None) -> float:
    """Runs cmd; on success renames rename[0] to rename[1] (so an interrupted compile leaves no fresh-looking object)."""
    if verbose:
        _log(shlex.join(cmd))
    t0 = time.monotonic()
    proc = subprocess.run(list(cmd), check=False, capture_output=True, text=True)
    # Print each job's output in one piece: the jobs run in parallel.
    if proc.returncode != 0:
        raise BuildError(f"{what} failed (exit {proc.returncode}):\n{shlex.join(cmd)}\n{proc.stdout}{proc.stderr}")
    if (proc.stdout or proc.stderr).strip():
        sys.stderr.write(proc.stdout + proc.stderr)
    if rename:
        os.replace(*rename)
    return time.monotonic() - t0


def _tmp(p: Path) -> Path:
    return p.with_name(p.name + ".tmp")


def _mtime(p: Path) -> float:
    return p.stat().st_mtime if p.exists() else -1.0


def default_jobs() -> int:
    """Parallel compile jobs: ``$BSATTN_JOBS``, else the number of CPU cores."""
    return max(1, int(os.environ.get("BSATTN_JOBS") or os.cpu_count() or 1))


def build_library(out_path: Path | str = DEFAULT_OUT, jobs: int | None = None, verbose: bool = False, *,
                  root: Path | str = ROOT, build_dir: Path | str | None = None,
                  python: str = sys.executable, env: Mapping[str, str] | None = None,
                  builder: str = "dev", tf: TFInfo | None = None, sanitize: bool = False) -> BuildResult:
    """Compile ``ops/`` (incrementally, ``jobs`` in parallel, default ``default_jobs()``) and link ``out_path``.

    Also writes ``_build_info.json`` next to ``out_path``. Raises BuildError on any failure. With
    ``builder="pip"`` the first and last lines also go to the terminal (see ``_log``).
    ``tf`` overrides the flags queried from ``python`` (tests use it to build without TensorFlow).
    ``sanitize``: a CPU-only ASan + UBSan build (SANITIZE_FLAGS), objects in their own variant directory.
    """
    t_start = time.monotonic()
    root, out_path = Path(root).resolve(), Path(out_path).resolve()
    env = os.environ if env is None else env
    sources = discover_sources(root)
    if not sources.cc:
        raise BuildError(f"no sources match {root / CC_GLOB}")
    toolkit = None if sanitize else resolve_cuda(sources, env)
    tf = tf or tf_info(python)

    # Objects of different flag sets (CPU/CUDA, another TF) live in different dirs: switching is never stale.
    flag_key = json.dumps([CXX_FLAGS, NVCC_FLAGS, tf.compile_flags, bool(toolkit), str(toolkit), cxx()]
                          + ([SANITIZE_FLAGS] if sanitize else []))
    kind = "sanitize-" if sanitize else "cuda-" if toolkit else "cpu-"
    variant = kind + hashlib.sha1(flag_key.encode()).hexdigest()[:10]
    obj_dir = Path(build_dir or root / "build" / "obj") / variant
    # An object is stale when its source, any ops/ header, or this file (the flags) is newer.
    dep_mtime = max([_mtime(h) for h in sources.headers] + [_mtime(Path(__file__))])

    def obj_for(src: Path) -> Path:
        return obj_dir / src.relative_to(root).with_suffix(src.suffix + ".o")

    jobs = jobs or default_jobs()
    jobs_todo: list[tuple[Path, list[str]]] = []
    objs = [obj_for(s) for s in sources.cc]
    cu_objs = [obj_for(s) for s in sources.cu] if toolkit else []
    # The .cu files first: each takes several times as long as a .cc file, so starting them first shortens
    # the build's critical path.
    for src, obj in zip(sources.cu, cu_objs):
        if _mtime(obj) < max(_mtime(src), dep_mtime):
            jobs_todo.append((src, nvcc_compile_cmd(src, _tmp(obj), toolkit, root)))
    for src, obj in zip(sources.cc, objs):
        if _mtime(obj) < max(_mtime(src), dep_mtime):
            jobs_todo.append((src, cxx_compile_cmd(src, _tmp(obj), tf, bool(toolkit), root, sanitize)))

    terminal = builder == "pip"
    if jobs_todo:
        n_cu = sum(src.suffix == ".cu" for src, _ in jobs_todo)
        cuda_part = (f" and {n_cu} CUDA files (nvcc, {', '.join(real for _, real in CUDA_ARCHS)}: minutes; "
                     "BSATTN_CUDA=0 builds CPU-only)") if n_cu else ""
        _log(f"building the op library: {len(jobs_todo) - n_cu} C++ files{cuda_part}, {jobs} in parallel",
             terminal)
    for src, _ in jobs_todo:
        obj_for(src).parent.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = {pool.submit(_run, cmd, verbose, f"compiling {src.relative_to(root)}",
                               (_tmp(obj_for(src)), obj_for(src))): src for src, cmd in jobs_todo}
        for fut in concurrent.futures.as_completed(futures):
            _log(f"compiled {futures[fut].relative_to(root)} in {fut.result():.1f} s")

    info = {
        "tf_version": tf.version,
        "cuda": bool(toolkit),
        "cuda_archs": [real for _, real in CUDA_ARCHS] if toolkit else [],
        "nvcc_version": nvcc_version(toolkit.nvcc) if toolkit else None,
        "builder": builder,
        "variant": variant,
        "sources": [p.relative_to(root).as_posix() for p in sources.cc + sources.cu],
    }
    info_path = out_path.parent / BUILD_INFO_NAME
    all_objs = objs + cu_objs
    old_info = json.loads(info_path.read_text()) if info_path.exists() else None
    # Relink also when the variant or the source list changed: the other variant's objects may be older,
    # and a deleted source leaves all remaining objects older than the library.
    linked = bool(jobs_todo) or _mtime(out_path) < max(map(_mtime, all_objs)) or old_info != info
    if linked:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _tmp(out_path)
        _run(link_cmd(objs, cu_objs, tmp, tf, toolkit, sanitize), verbose, f"linking {out_path.name}")
        if toolkit and (bad := undefined_cuda_symbols(tmp)):
            tmp.unlink()
            raise BuildError(f"{out_path.name} has undefined CUDA symbols {bad[:8]}: they would bind to "
                             "TensorFlow's CUDA stub. The CUDA objects must be linked before TF's library.")
        os.replace(tmp, out_path)  # atomic: a process that has the old library mapped keeps working
        info_path.write_text(json.dumps(info, indent=1) + "\n")
    seconds = time.monotonic() - t_start
    _log(f"{out_path} ({'CUDA' if toolkit else 'CPU-only'}, TF {tf.version}): {len(jobs_todo)} compiled, "
         f"{'linked' if linked else 'up to date'}, {seconds:.1f} s", terminal and bool(jobs_todo))
    return BuildResult(out_path, info, [s for s, _ in jobs_todo], linked, seconds)


# --------------------------------------------------------------------------- Bazel


def bazelrc_text(python: str = sys.executable, env: Mapping[str, str] = os.environ,
                 root: Path = ROOT) -> str:
    """The .bazelrc that configure.py writes: points the repository rules at this TF and CUDA."""
    tf = tf_info(python)
    q = shlex.quote  # .bazelrc lines are tokenized like a shell command line
    copts = [f for f in tf.compile_flags if not f.startswith(("-I", "--std", "-std"))]
    lines = [
        "# Generated by configure.py from build_config.py; do not edit, re-run `python configure.py`.",
        f"startup --output_user_root={q(str(root / 'build' / 'bazel'))}",  # per checkout: clones don't collide
        f"build --repo_env=TF_PYTHON={q(python)}",
        f"build --repo_env=TF_VERSION={q(tf.version)}",
        f"build --repo_env=TF_HEADER_DIR={q(tf.include_dir)}",
        f"build --repo_env=TF_SHARED_LIBRARY_DIR={q(tf.lib_dir)}",
        "build --cxxopt=-std=c++17 --host_cxxopt=-std=c++17",
        "build " + " ".join(f"--copt={q(f)}" for f in [*copts, *CXX_FLAGS]),
        # No sandbox: linux-sandbox in Debian's Bazel prints dozens of debug lines per action, and a sandbox
        # symlinks TF's 18k headers for every compile (~3 s each). Undeclared includes are still caught (.d files).
        "build --spawn_strategy=local",
        "build:cuda --define=using_cuda=true",
    ]
    toolkit = None if cuda_mode(env) == "0" else find_cuda(env)
    if toolkit:
        lines += [f"build --repo_env=BSATTN_NVCC={q(str(toolkit.nvcc))}",
                  f"build --repo_env=BSATTN_CUDART_STATIC={q(str(toolkit.cudart_static))}",
                  f"build --repo_env=BSATTN_NVCC_FLAGS={q(' '.join(NVCC_FLAGS))}",
                  f"build --repo_env=BSATTN_CUDA_ARCHS={q(' '.join(real for _, real in CUDA_ARCHS))}"]
    lines.append("try-import %workspace%/.bazelrc.user")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="library to write (default: %(default)s)")
    ap.add_argument("-j", "--jobs", type=int, default=default_jobs(), help="default: $BSATTN_JOBS, else the cores")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every command")
    ap.add_argument("--python", default=sys.executable, help="python whose tensorflow to build against")
    ap.add_argument("--print-bazelrc", action="store_true", help="print the .bazelrc for configure.py and exit")
    ap.add_argument("--check-nm", type=Path, metavar="LIB", help="fail if LIB has undefined cuda* symbols")
    ap.add_argument("--sanitize", action="store_true",
                    help=f"CPU-only ASan+UBSan build, by default to {SANITIZE_OUT.relative_to(ROOT)} (not the main library)")
    args = ap.parse_args(argv)
    try:
        if args.print_bazelrc:
            sys.stdout.write(bazelrc_text(args.python))
        elif args.check_nm:
            if bad := undefined_cuda_symbols(args.check_nm):
                raise BuildError(f"{args.check_nm} has undefined CUDA symbols: {' '.join(bad)}")
            print(f"{args.check_nm}: no undefined cuda symbols")
        else:
            out = SANITIZE_OUT if args.sanitize and args.out == DEFAULT_OUT else args.out
            build_library(out, args.jobs, args.verbose, python=args.python, sanitize=args.sanitize,
                          builder="sanitize" if args.sanitize else "dev")
    except BuildError as e:
        _log(f"ERROR: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
