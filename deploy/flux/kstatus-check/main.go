// kstatus-check prints what Flux's health checks (kstatus, sigs.k8s.io/cli-utils/pkg/kstatus) make of
// Kubernetes objects: it reads a JSON array of objects on stdin and writes one JSON line per object,
// {"name": ..., "status": "Current|InProgress|Failed|...", "message": ...}.
// e2e/tests/chart_gitops.rs runs it against UpdateCampaign statuses in the shape the operator writes.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
)

func main() {
	var objects []json.RawMessage
	if err := json.NewDecoder(os.Stdin).Decode(&objects); err != nil {
		fmt.Fprintf(os.Stderr, "kstatus-check: reading objects: %v\n", err)
		os.Exit(2)
	}
	out := json.NewEncoder(os.Stdout)
	for _, o := range objects {
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(o); err != nil {
			fmt.Fprintf(os.Stderr, "kstatus-check: decoding an object: %v\n", err)
			os.Exit(2)
		}
		res, err := status.Compute(u)
		if err != nil {
			fmt.Fprintf(os.Stderr, "kstatus-check: %s: %v\n", u.GetName(), err)
			os.Exit(1)
		}
		_ = out.Encode(map[string]string{"name": u.GetName(), "status": res.Status.String(), "message": res.Message})
	}
}
