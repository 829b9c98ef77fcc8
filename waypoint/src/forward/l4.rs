//! The path of a connection that is not HTTP, once L4 policy let it
//! through: an endpoint picked like a request's, and bytes copied both
//! ways until either side closes.

use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, info};
use weft_hbone::Transferred;

use crate::context::{ConnCtx, Endpoint};
use crate::metrics::{count_for, Metrics};
use crate::resilience::registry::ServiceState;
use crate::upstream::Upstream;

/// Carries `io` to one of `endpoints`.
pub async fn carry<S>(
    upstream: &Upstream,
    metrics: &Metrics,
    service: &ServiceState,
    ctx: &ConnCtx,
    endpoints: &[Endpoint],
    mut io: S,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((ep, _inflight)) = service.pick(endpoints) else {
        metrics.failure("no_healthy_upstream");
        return;
    };
    // Each carried connection is an upstream connection: it takes a slot
    // under the service's maxConnections for as long as it lasts.
    let _slot = match service.limits().try_connect(ep.addr) {
        Ok(slot) => slot,
        Err(limit) => {
            metrics.overflowed(ctx.derived.service.clone(), limit);
            info!(component = "waypoint", endpoint = %ep.addr, "L4 connection turned away: maxConnections reached");
            return;
        }
    };
    let mut stream = match upstream.open_stream(&ep, ctx.derived.tunnel.clone()).await {
        Ok(s) => s,
        Err(e) => {
            metrics.failure("connect");
            info!(component = "waypoint", endpoint = %ep.addr, error = %e, "L4 upstream connect failed");
            return;
        }
    };
    count_for(&metrics.l4_connections, ctx.derived.service.clone());
    let moved = Transferred::default();
    if let Err(e) = weft_hbone::copy_bidirectional(&mut io, &mut stream, &moved).await {
        debug!(component = "waypoint", error = %e, "L4 connection ended with an error");
    }
}
