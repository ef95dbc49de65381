"""@local_config_tf: the installed TensorFlow's headers and libtensorflow_framework.so.2 (symlinked, not copied).

configure.py passes the locations with --repo_env (TF_HEADER_DIR, TF_SHARED_LIBRARY_DIR, TF_VERSION);
without them the rule asks $TF_PYTHON (default python3) itself.
"""

_QUERY = "import os; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '3'; import tensorflow as tf; " + \
         "print(tf.sysconfig.get_include()); print(tf.sysconfig.get_lib()); print(tf.__version__)"

_BUILD = """
package(default_visibility = ["//visibility:public"])

cc_library(
    name = "tf_header_lib",
    hdrs = glob(["include/**"]),
    includes = ["include"],
)

cc_import(
    name = "libtensorflow_framework",
    shared_library = "libtensorflow_framework.so.2",
)
"""

def _tf_configure_impl(rctx):
    env = rctx.os.environ
    if env.get("TF_HEADER_DIR") and env.get("TF_SHARED_LIBRARY_DIR") and env.get("TF_VERSION"):
        inc, libdir, version = env["TF_HEADER_DIR"], env["TF_SHARED_LIBRARY_DIR"], env["TF_VERSION"]
    else:
        python = env.get("TF_PYTHON", "python3")
        res = rctx.execute([python, "-c", _QUERY])
        if res.return_code != 0:
            fail("tf_configure: cannot import tensorflow with %s (run `python configure.py`):\n%s" % (python, res.stderr))
        inc, libdir, version = res.stdout.strip().splitlines()[-3:]
    framework = rctx.path(libdir + "/libtensorflow_framework.so.2")
    if not framework.exists:
        fail("tf_configure: %s not found; re-run `python configure.py`" % framework)
    rctx.symlink(inc, "include")
    rctx.symlink(framework, "libtensorflow_framework.so.2")
    rctx.file("BUILD", _BUILD)
    rctx.file("defs.bzl", "TF_VERSION = %r\n" % version)

tf_configure = repository_rule(
    implementation = _tf_configure_impl,
    environ = ["TF_PYTHON", "TF_HEADER_DIR", "TF_SHARED_LIBRARY_DIR", "TF_VERSION"],
    local = True,
)
