"""@local_config_cuda: the CUDA toolkit found by configure.py (build_config.find_cuda), or none.

Reads --repo_env BSATTN_NVCC, BSATTN_CUDART_STATIC, BSATTN_NVCC_FLAGS and BSATTN_CUDA_ARCHS (space-separated;
their values come from build_config.py, the single source of truth). defs.bzl gets CUDA_AVAILABLE, NVCC,
NVCC_FLAGS, CUDA_ARCHS and NVCC_VERSION; :cudart_static is the static CUDA runtime.
"""

def _words(s):
    return [w for w in s.split(" ") if w]  # Bazel 4's split() needs a separator

def _nvcc_version(rctx, nvcc):
    out = rctx.execute([nvcc, "--version"]).stdout  # "... Cuda compilation tools, release 13.0, V13.0.88"
    i = out.find("release ")
    return out[i + len("release "):].split(",")[0].strip() if i >= 0 else "unknown"

def _cuda_configure_impl(rctx):
    env = rctx.os.environ
    nvcc = env.get("BSATTN_NVCC", "")
    cudart = env.get("BSATTN_CUDART_STATIC", "")
    if not nvcc or not cudart:
        rctx.file("BUILD", "")
        rctx.file("defs.bzl", "CUDA_AVAILABLE = False\nNVCC = None\nNVCC_FLAGS = []\nCUDA_ARCHS = []\nNVCC_VERSION = None\n")
        return
    for f in [nvcc, cudart]:
        if not rctx.path(f).exists:
            fail("cuda_configure: %s does not exist; re-run `python configure.py`" % f)
    rctx.symlink(cudart, "lib/libcudart_static.a")
    rctx.file("BUILD", """
package(default_visibility = ["//visibility:public"])

cc_import(
    name = "cudart_static",
    static_library = "lib/libcudart_static.a",
)
""")
    rctx.file("defs.bzl", "CUDA_AVAILABLE = True\nNVCC = %r\nNVCC_FLAGS = %r\nCUDA_ARCHS = %r\nNVCC_VERSION = %r\n" % (
        nvcc,
        _words(env.get("BSATTN_NVCC_FLAGS", "")),
        _words(env.get("BSATTN_CUDA_ARCHS", "")),
        _nvcc_version(rctx, nvcc),
    ))

cuda_configure = repository_rule(
    implementation = _cuda_configure_impl,
    environ = ["BSATTN_NVCC", "BSATTN_CUDART_STATIC", "BSATTN_NVCC_FLAGS", "BSATTN_CUDA_ARCHS"],
    local = True,
)
