// Command coredns is upstream CoreDNS with its default plugin set, at the version kubeadm deploys
// for the pinned Kubernetes release; it is its own module because CoreDNS pins client-go versions
// that differ from Kubernetes' own (e2e/kind/node-image.sh builds it).
package main

import (
	_ "github.com/coredns/coredns/core/plugin"
	"github.com/coredns/coredns/coremain"
)

func main() { coremain.Run() }
