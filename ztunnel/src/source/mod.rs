//! How the mesh model arrives: a watched file (`file`, standalone) or the
//! controller's config stream (`grpc`); both fill the same `MeshState`.

pub mod file;
pub mod grpc;
