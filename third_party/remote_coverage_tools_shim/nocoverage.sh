#!/bin/sh
echo "bazel coverage is not supported offline (remote_coverage_tools is a shim)" >&2
exit 1
