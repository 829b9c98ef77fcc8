//! Standalone mode's model source: a watched file. (With a controller, the
//! shared config stream of `weft_dataplane::control` fills the same
//! `MeshState`.)

pub mod file;
