//! The fake Kubernetes API server, shared with other crates' tests
//! (`testsupport/src/fake_api.rs`).

#![allow(unused_imports)]

pub use weft_testsupport::fake_api::*;
