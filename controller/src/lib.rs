//! weft-controller: the control plane. Kubernetes (or a folder of
//! manifests) in, one mesh model out, streamed to ztunnels over gRPC; also
//! the mesh CA.
