//! The request body as the attempts send it: a small body of known size is
//! read whole first, so that a retry or a mirror can send it again; a
//! larger or unsized one streams through to a single attempt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tracing::debug;

use super::reply::{LocalReply, Stage};
use crate::body::{self, Body, Counted};

/// Request bodies up to this size are buffered so they can be retried and
/// mirrored; larger or unsized ones stream through in one attempt.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

pub enum RequestBody {
    Replay(Bytes),
    /// `None` once sent: a streamed body cannot be sent twice.
    Streaming(Option<Body>),
}

impl RequestBody {
    /// Reads the client's body when it is small enough to keep; its bytes
    /// are counted into `received` either way.
    pub async fn read(incoming: Incoming, received: &Arc<AtomicU64>) -> Stage<Self> {
        match http_body::Body::size_hint(&incoming).exact() {
            Some(n) if n <= MAX_REPLAY_BODY => match incoming.collect().await {
                Ok(c) => {
                    let b = c.to_bytes();
                    received.fetch_add(b.len() as u64, Ordering::Relaxed);
                    Ok(Self::Replay(b))
                }
                Err(e) => {
                    debug!(component = "waypoint", error = %e, "client body failed");
                    Err(LocalReply::new(
                        "downstream_reset",
                        StatusCode::BAD_REQUEST,
                        "request body failed\n",
                    ))
                }
            },
            _ => Ok(Self::Streaming(Some(body::boxed(Counted::new(
                incoming,
                received.clone(),
            ))))),
        }
    }

    /// The bytes, when the body can be sent more than once.
    pub fn replayable(&self) -> Option<&Bytes> {
        match self {
            Self::Replay(b) => Some(b),
            Self::Streaming(_) => None,
        }
    }

    /// The body for the next attempt; `None` once a streamed body is gone.
    pub fn next(&mut self) -> Option<Body> {
        match self {
            Self::Replay(b) => Some(body::full(b.clone())),
            Self::Streaming(s) => s.take(),
        }
    }

    /// An attempt that sent nothing gives a streamed body back, whole.
    pub fn give_back(&mut self, unsent: Body) {
        if let Self::Streaming(s) = self {
            *s = Some(unsent);
        }
    }
}
