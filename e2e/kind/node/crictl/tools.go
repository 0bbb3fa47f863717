//go:build tools

// Package tools pins crictl (cri-tools), which kind's node image carries for inspecting the
// node's containers; e2e/kind/node-image.sh builds it with `go build`.
package tools

import _ "sigs.k8s.io/cri-tools/cmd/crictl"
