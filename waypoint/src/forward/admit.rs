//! Admission, once the request is routed: the backend service's local rate
//! limit (429 with `retry-after`) and its circuit breaker, the limit on
//! requests in flight (503 with `x-weft-overflow`).

use http::{HeaderMap, StatusCode};

use super::reply::{LocalReply, Stage};
use crate::context::Backend;
use crate::metrics::{count_for, Metrics};
use crate::resilience::registry::ServiceState;
use crate::resilience::RequestPermit;

/// The local rate limit, keyed as the service's TrafficPolicy says
/// (a header, or the client's identity).
pub fn rate_limit(
    service: &ServiceState,
    backend: &Backend,
    headers: &HeaderMap,
    identity: &str,
    metrics: &Metrics,
) -> Stage<()> {
    let Err(retry_after) = service.rate_limit(headers, identity) else {
        return Ok(());
    };
    count_for(&metrics.rate_limited, backend.label());
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    Err(LocalReply::new(
        "rate_limited",
        StatusCode::TOO_MANY_REQUESTS,
        "rate limited\n",
    )
    .with_header("retry-after", &secs.to_string()))
}

/// A slot under the service's concurrent-request limit, held until the
/// response headers are back.
pub fn admit(service: &ServiceState, backend: &Backend, metrics: &Metrics) -> Stage<RequestPermit> {
    service.start_request().map_err(|limit| {
        metrics.overflowed(backend.label(), limit);
        LocalReply::new(
            "overflow",
            StatusCode::SERVICE_UNAVAILABLE,
            "upstream overflow\n",
        )
        .with_header("x-weft-overflow", "true")
    })
}
