//! Request mirroring: a copy of a buffered request to each mirror backend
//! the route sampled, fire and forget. The mirror's answer is read (so its
//! connection can be reused) and dropped; the client never waits for it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::Request;
use http_body_util::BodyExt;
use tracing::debug;
use weft_api::model::BackendRef;

use super::head::clone_head;
use crate::body;
use crate::context::ConnCtx;
use crate::resilience::registry::Registry;
use crate::state::Compiled;
use crate::upstream::Upstream;

/// A mirror that has not answered by then is given up.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends `head` + `body` to one endpoint of each of `mirrors`.
pub fn spawn_all(
    upstream: &Arc<Upstream>,
    resilience: &Registry,
    snap: &Arc<Compiled>,
    ctx: &ConnCtx,
    head: &Parts,
    body: &Bytes,
    mirrors: Vec<BackendRef>,
) {
    for mirror in mirrors {
        let upstream = upstream.clone();
        let snap = snap.clone();
        let head = clone_head(head);
        let body = body.clone();
        let proto = ctx.proto;
        let tunnel = ctx.derived.tunnel.clone();
        // The mirror's own circuit breaker bounds its connections.
        let service = resilience.for_service(&snap, &mirror.namespace, &mirror.name);
        tokio::spawn(async move {
            let eps = snap.endpoints(&mirror.namespace, &mirror.name, mirror.port);
            let Some(ep) = eps.get(rand::random::<usize>() % eps.len().max(1)).cloned() else {
                return;
            };
            let req = Request::from_parts(head, body::full(body));
            match tokio::time::timeout(
                MIRROR_TIMEOUT,
                upstream.send(&ep, proto, req, &tunnel, service.limits()),
            )
            .await
            {
                Ok(Ok(resp)) => {
                    let _ = resp.into_body().collect().await;
                }
                Ok(Err(e)) => debug!(component = "mirror", error = %e, "mirror request failed"),
                Err(_) => debug!(component = "mirror", "mirror request timed out"),
            }
        });
    }
}
