#!/bin/sh
# Debian packages some tests need, installed when missing and run as root with apt. Never fails `make test`: without
# them those tests skip, saying what to install.
#   chromium + chromium-driver: the web page's browser test
#   espeak-ng: speech for the generated clips of the video tests (tests/test_video.py)
need() {  # need COMMAND PACKAGES...: install PACKAGES unless COMMAND exists
    command -v "$1" >/dev/null 2>&1 && return 0
    shift
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        echo "tests that need them will skip: missing $* (sudo apt-get install $*)"
        return 0
    fi
    echo "installing $* for the tests"
    [ -n "$updated" ] || { apt-get update -qq >/dev/null 2>&1; updated=1; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1 \
        || echo "could not install $*; the tests that need them will skip"
}
updated=""
need chromedriver chromium chromium-driver
need espeak-ng espeak-ng
exit 0
