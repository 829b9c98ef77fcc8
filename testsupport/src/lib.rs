//! Test support shared by Weft's crates. `fake_api`: a fake of the
//! Kubernetes API server's HTTP API (no API server can run on the
//! development and CI machines), used by the controller's tests and by
//! `weftctl`'s end-to-end tests.

pub mod fake_api;
