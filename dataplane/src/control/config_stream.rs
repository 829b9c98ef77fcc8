//! The mesh model from the controller's config stream (`weft.v1.MeshConfig`).
//!
//! Keeps a local copy of what the controller sent, checks each update
//! (full snapshot or delta) whole, applies it, hands the new model to the
//! [`ConfigSink`] and ACKs; an update that does not convert or validate
//! is NACKed with the reason and the last good model keeps serving.
//! Disconnected, the client keeps serving the last good model and
//! reconnects with capped exponential backoff, resuming from the last
//! acknowledged version (the controller then sends only what changed, or a
//! full snapshot if it cannot). The trust bundle carried by each update goes
//! to the shared [`TrustRoots`] the TLS code reads.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};
use weft_api::config_cache::{Changes, ConfigCache};
use weft_api::proto::mesh_config_client::MeshConfigClient;
use weft_api::proto::{bearer, ConfigUpdate, ResumePoint, SubscribeRequest};

use weft_pki::TrustBundle;

use super::addr::ControllerAddr;
use super::trust::{error_chain, status_text};
use crate::certs::TrustRoots;

pub const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// The largest update a client takes. A full snapshot is one message of
/// about 100 bytes per pod: 4.8 MB at 50,000 pods, over gRPC's default of
/// 4 MiB, which left every client of such a cluster reconnecting forever.
/// 256 MiB is room for 2.5 million pods; the controller is authenticated.
pub const MAX_UPDATE_BYTES: usize = 256 << 20;

/// Who subscribes: a ztunnel gets what its node's pods need; a waypoint
/// also gets routes, traffic policies and every authorization policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Ztunnel,
    Waypoint,
}

/// Where accepted models go.
pub trait ConfigSink: Send + Sync + 'static {
    /// An update (already checked) changed the model: `cache` holds the
    /// whole new model, `changes` what the update changed.
    fn model_changed(&self, cache: &ConfigCache, changes: &Changes, version: u64);
    /// An update was refused; the last good model keeps serving.
    fn rejected(&self, _version: u64, _error: &str) {}
}

/// Where and who: the controller's address, this node's name, the bearer
/// token, and the trust bundle the config stream keeps current.
#[derive(Clone)]
pub struct ConfigStream {
    pub endpoint: ControllerAddr,
    pub node: String,
    pub token: String,
    pub role: Role,
    pub trust: TrustRoots,
    pub sink: Arc<dyn ConfigSink>,
}

/// What survives reconnects.
#[derive(Default)]
struct Progress {
    cache: ConfigCache,
    resume: Option<ResumePoint>,
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The whole chain: tonic's own message is only "transport error".
    #[error("cannot connect: {}", error_chain(.0))]
    Connect(#[from] tonic::transport::Error),
    #[error("{}", status_text(.0))]
    Status(#[from] tonic::Status),
    #[error("{0}")]
    Protocol(String),
}

impl ConfigStream {
    pub async fn run(self) {
        let mut progress = Progress::default();
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let mut got_update = false;
            let result = self.session(&mut progress, &mut got_update).await;
            if got_update {
                backoff = INITIAL_BACKOFF;
            }
            match result {
                Ok(()) => {
                    warn!(component = "config", endpoint = %self.endpoint.uri, "config stream ended by the controller; reconnecting")
                }
                Err(e) => {
                    warn!(component = "config", endpoint = %self.endpoint.uri, error = %e, retry_in_ms = backoff.as_millis() as u64, "config stream failed; serving the last good model and reconnecting")
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn session(&self, p: &mut Progress, got_update: &mut bool) -> Result<(), SessionError> {
        let ep = self
            .endpoint
            .endpoint()
            .map_err(SessionError::Protocol)?
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10));
        let channel = self.endpoint.connect(ep).await?;
        let (tx, rx) = mpsc::channel(8);
        let hello = match self.role {
            Role::Ztunnel => SubscribeRequest::hello(&self.node, p.resume.clone()),
            Role::Waypoint => SubscribeRequest::waypoint_hello(&self.node, p.resume.clone()),
        };
        let _ = tx.send(hello).await;
        let outbound =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
        let mut req = tonic::Request::new(outbound);
        let auth = bearer(&self.token)
            .parse()
            .map_err(|_| SessionError::Protocol("token is not valid metadata".into()))?;
        req.metadata_mut().insert("authorization", auth);
        let mut inbound = MeshConfigClient::new(channel)
            .max_decoding_message_size(MAX_UPDATE_BYTES)
            .subscribe(req)
            .await?
            .into_inner();
        info!(component = "config", endpoint = %self.endpoint.uri, resume = p.resume.is_some(), "subscribed to the controller");
        while let Some(update) = inbound.message().await? {
            *got_update = true;
            let answer = self.apply(p, &update);
            if tx.send(answer).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Applies one update and returns the ACK or NACK for it.
    fn apply(&self, p: &mut Progress, u: &ConfigUpdate) -> SubscribeRequest {
        let same_instance = p
            .resume
            .as_ref()
            .is_some_and(|r| r.instance_id == u.instance_id);
        let checked = if !u.full && !same_instance {
            Err("a delta from a controller instance this client has no config from".to_owned())
        } else if u.trust_bundle_pem.is_empty() {
            Ok(None)
        } else {
            TrustBundle::from_pem(&u.trust_bundle_pem.concat())
                .map(Some)
                .map_err(|e| format!("trust bundle: {e}"))
        };
        // Checked whole before anything is applied: a rejected update
        // leaves the cache and the serving model as they were.
        let checked =
            checked.and_then(|bundle| p.cache.apply_changes(u).map(|changes| (changes, bundle)));
        match checked {
            Ok((changes, bundle)) => {
                if let Some(b) = bundle {
                    self.trust.set(b);
                }
                if !changes.is_empty() {
                    self.sink.model_changed(&p.cache, &changes, u.version);
                    info!(
                        component = "config",
                        version = u.version,
                        full = u.full,
                        "mesh model applied"
                    );
                }
                p.resume = Some(ResumePoint {
                    instance_id: u.instance_id.clone(),
                    version: u.version,
                });
                SubscribeRequest::ack(u.version)
            }
            Err(error) => {
                self.sink.rejected(u.version, &error);
                warn!(component = "config", version = u.version, error = %error, "config update rejected; keeping the last good model");
                SubscribeRequest::nack(u.version, error)
            }
        }
    }
}
