#!/bin/sh
# SPIKE (issue 13): build the Go responder (static, standard library only) into
# template/pythongo.agent, which the "pythongo" template runs as the guest's init.
# A real port would install golang-go in scripts/setup.sh and build in `template build`.
set -eu
cd "$(dirname "$0")"
CGO_ENABLED=0 GOFLAGS=-trimpath go build -ldflags="-s -w -buildid=" -o template/pythongo.agent .
ls -l template/pythongo.agent
