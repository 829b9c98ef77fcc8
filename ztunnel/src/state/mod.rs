//! The in-memory mesh model the data plane reads. A `Snapshot` is an
//! immutable, indexed view of one `MeshModel`; [`MeshState`] swaps whole
//! snapshots (the shared model swap of `weft_dataplane::state`) when the
//! source (the controller's stream, or a watched file) delivers a new
//! model, so a connection sees one consistent version from start to end.

mod snapshot;

pub use snapshot::{OutboundRoute, Snapshot, WorkloadRef};
use weft_api::config_cache::{Changes, ConfigCache};
use weft_api::MeshModel;
use weft_dataplane::state::{Compiled, ModelState};

pub type MeshState = ModelState<Snapshot>;

impl Compiled for Snapshot {
    fn compile(model: MeshModel, version: u64) -> Self {
        Snapshot::new(model, version)
    }

    fn version(&self) -> u64 {
        self.version
    }

    fn update(&self, cache: &ConfigCache, changes: &Changes, version: u64) -> Self {
        Snapshot::update(self, cache, changes, version)
    }
}
