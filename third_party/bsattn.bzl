"""Macros for //ops:BUILD (BUILD files cannot hold `if`): the optional CUDA part and the build-info file."""

load("@local_config_cuda//:defs.bzl", "CUDA_ARCHS", "CUDA_AVAILABLE", "NVCC", "NVCC_FLAGS", "NVCC_VERSION")
load("@local_config_tf//:defs.bzl", "TF_VERSION")

def bsattn_cuda_kernels(name, srcs, hdrs, cuda_setting):
    """Compiles each .cu with nvcc (one genrule per file, so they build in parallel) into cc_library `name`.

    Returns struct(enabled, deps, copts) for the op library: with no .cu sources nothing is defined
    (a genrule without srcs is an error) and deps/copts are empty, also under --config=cuda.
    """
    if not srcs:
        return struct(enabled = False, deps = [], copts = [])
    archives = []
    for src in srcs:
        base = src.split("/")[-1][:-len(".cu")]
        out = "_%s/%s.a" % (name, base)
        if CUDA_AVAILABLE:
            cmd = "%s -c %s -I. $(location %s) -o $(@D)/%s.o && ar rcs $@ $(@D)/%s.o" % (
                NVCC,
                " ".join(NVCC_FLAGS),
                src,
                base,
                base,
            )
        else:
            cmd = "echo 'error: --config=cuda but configure.py found no CUDA toolkit (set CUDA_HOME and " + \
                  "re-run python configure.py, or build without --config=cuda)' >&2; exit 1"
        native.genrule(name = "%s_%s" % (name, base), srcs = [src] + hdrs, outs = [out], cmd = cmd)
        archives.append(out)
    native.cc_library(
        name = name,
        srcs = archives,
        deps = ["@local_config_cuda//:cudart_static"] if CUDA_AVAILABLE else [],
        linkopts = ["-ldl", "-lrt", "-lpthread"],  # what libcudart_static.a needs
    )
    return struct(
        enabled = True,
        deps = select({cuda_setting: [":" + name], "//conditions:default": []}),
        copts = select({cuda_setting: ["-DGOOGLE_CUDA=1"], "//conditions:default": []}),
    )

def _json(cuda):
    # Same keys as build_config.build_library writes; read by bsattn/_loader.py.
    return '{"tf_version": "%s", "cuda": %s, "cuda_archs": [%s], "nvcc_version": %s, "builder": "bazel", "variant": "%s"}' % (
        TF_VERSION,
        "true" if cuda else "false",
        ", ".join(['"%s"' % a for a in CUDA_ARCHS]) if cuda else "",
        '"%s"' % NVCC_VERSION if cuda else "null",
        "bazel-cuda" if cuda else "bazel-cpu",
    )

def bsattn_build_info(name, out, cuda_enabled, cuda_setting):
    """Writes the library's _build_info.json (TF version, CUDA or not)."""
    cpu_cmd = "echo '%s' > $@" % _json(False)
    native.genrule(
        name = name,
        outs = [out],
        cmd = select({cuda_setting: "echo '%s' > $@" % _json(True), "//conditions:default": cpu_cmd}) if cuda_enabled else cpu_cmd,
    )
