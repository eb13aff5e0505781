#!/usr/bin/env bash
# Make Fashion-MNIST available without internet: Debian ships it as `dataset-fashion-mnist`
# (installed under /usr/share/datasets/fashion-mnist). Where that is not possible, cqkd falls
# back to --data-dir or torchvision's download at run time.
set -euo pipefail
DEB_DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: found in $DEB_DIR"
    exit 0
fi
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"
    if ! apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1; then
        apt-get update -qq >/dev/null 2>&1 || true
        apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || true
    fi
fi
if [ -f "$DEB_DIR/train-images-idx3-ubyte.gz" ]; then
    echo "Fashion-MNIST: installed in $DEB_DIR"
else
    echo "Fashion-MNIST: not installed system-wide (needs root and apt-get);" \
         "cqkd will use --data-dir or torchvision's download instead" >&2
fi
