"""The conformance lane: real transformers families built offline, merged by swudi, checked against
float64 references (docs/conformance.md; `make test-conformance`)."""
