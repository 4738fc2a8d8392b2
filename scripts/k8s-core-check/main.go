// k8s-core-check strictly decodes the core Kubernetes resources of manifest files (apps/v1,
// v1, policy/v1) into the Kubernetes API's own Go types, as the API server decodes them: an
// unknown or misspelt field, a duplicated field, a value of the wrong type or an unknown kind
// of those groups fails. Resources of other groups (the operators' custom resources) are
// left to kubeconform and its committed schemas, and counted as skipped.
//
// Usage: k8s-core-check FILE...   (exit 1 when any resource is invalid)
package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// The groups this tool owns: every resource whose apiVersion is one of these is decoded.
var checkedGroups = map[string]bool{"": true, "apps": true, "policy": true}

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: k8s-core-check FILE...")
		os.Exit(2)
	}
	scheme := runtime.NewScheme()
	for _, add := range []func(*runtime.Scheme) error{corev1.AddToScheme, appsv1.AddToScheme, policyv1.AddToScheme} {
		if err := add(scheme); err != nil {
			panic(err)
		}
	}
	decoder := serializer.NewCodecFactory(scheme, serializer.EnableStrict).UniversalDeserializer()
	valid, invalid, skipped := 0, 0, 0
	for _, path := range os.Args[1:] {
		f, err := os.Open(path)
		if err != nil {
			fmt.Printf("%s: %v\n", path, err)
			invalid++
			continue
		}
		docs := utilyaml.NewYAMLReader(bufio.NewReader(f))
		for {
			doc, err := docs.Read()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				fmt.Printf("%s: %v\n", path, err)
				invalid++
				break
			}
			var fields map[string]any
			if err := yaml.Unmarshal(doc, &fields); err != nil {
				fmt.Printf("%s: %v\n", path, err)
				invalid++
				continue
			}
			if len(fields) == 0 {
				continue // an empty document (comments only)
			}
			var meta struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				Metadata   struct {
					Name string `json:"name"`
				} `json:"metadata"`
			}
			if err := yaml.Unmarshal(doc, &meta); err != nil {
				fmt.Printf("%s: %v\n", path, err)
				invalid++
				continue
			}
			gv, err := schema.ParseGroupVersion(meta.APIVersion)
			if meta.Kind == "" || meta.APIVersion == "" || err != nil {
				fmt.Printf("%s - a resource without a kind or a valid apiVersion (%q, %q)\n", path, meta.APIVersion, meta.Kind)
				invalid++
				continue
			}
			if !checkedGroups[gv.Group] {
				skipped++
				continue
			}
			if _, _, err := decoder.Decode(doc, nil, nil); err != nil {
				fmt.Printf("%s - %s %s is invalid: %v\n", path, meta.Kind, meta.Metadata.Name, err)
				invalid++
				continue
			}
			valid++
		}
		f.Close()
	}
	fmt.Printf("Summary: Valid: %d, Invalid: %d, Skipped: %d\n", valid, invalid, skipped)
	if invalid > 0 {
		os.Exit(1)
	}
}
