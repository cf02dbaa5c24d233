#!/bin/sh
# Headless Chromium + chromedriver (Debian packages) for the web page's browser test, installed when missing and
# run as root with apt. Never fails `make test`: without a browser that test skips.
command -v chromedriver >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "browser test will skip: no chromedriver (Debian: sudo apt-get install chromium chromium-driver)"
    exit 0
fi
echo "installing chromium + chromium-driver for the browser test"
(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium; the browser test will skip"
exit 0
