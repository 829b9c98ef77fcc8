//! How the mesh model arrives. Today: a watched file (`file`); the
//! controller's gRPC stream plugs in beside it and fills the same
//! `MeshState`.

pub mod file;
