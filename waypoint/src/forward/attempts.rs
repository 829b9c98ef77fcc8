//! The attempts of one admitted request, all within the route's request
//! timeout (504): each injects the service's faults, picks an endpoint by
//! least-request among those not ejected, sends with the per-try timeout,
//! feeds outlier detection with the outcome, and is retried when the
//! route's retry policy and the service's retry budget allow.

use http::request::Parts;
use http::{Request, Response, StatusCode};
use tracing::{debug, info};

use super::finish::Ledger;
use super::head::clone_head;
use super::replay::RequestBody;
use super::reply::{LocalReply, Stage};
use crate::body::Body;
use crate::context::{ConnCtx, Endpoint, Proto};
use crate::metrics::{count_for, Metrics};
use crate::plan::Plan;
use crate::resilience::registry::ServiceState;
use crate::resilience::{Outcome, OVERFLOW_HEADER};
use crate::state::Compiled;
use crate::upstream::{Upstream, UpstreamError};

/// What the attempts of one request share.
pub struct Attempts<'a> {
    pub upstream: &'a Upstream,
    pub metrics: &'a Metrics,
    pub snap: &'a Compiled,
    pub ctx: &'a ConnCtx,
    pub plan: &'a Plan<'a>,
    pub service: &'a ServiceState,
}

/// How one attempt that reached an endpoint ended.
enum Tried {
    /// The answer to give the client.
    Final(Response<Body>),
    /// Try again; a retryable response is kept in case no try is left.
    Again(Option<Response<Body>>),
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Upstream(UpstreamError),
    #[error("per-try timeout")]
    Timeout,
}

impl Attempts<'_> {
    /// Every attempt, the whole exchange up to the response headers bounded
    /// by the route's request timeout.
    pub async fn run(
        &self,
        parts: &mut Parts,
        body: RequestBody,
        ledger: &mut Ledger,
    ) -> Stage<Response<Body>> {
        let all = self.all(parts, body, ledger);
        match self.plan.request_timeout {
            Some(t) => tokio::time::timeout(t, all).await.unwrap_or_else(|_| {
                Err(LocalReply::new(
                    "request_timeout",
                    StatusCode::GATEWAY_TIMEOUT,
                    "request timeout\n",
                ))
            }),
            None => all.await,
        }
    }

    async fn all(
        &self,
        parts: &mut Parts,
        mut body: RequestBody,
        ledger: &mut Ledger,
    ) -> Stage<Response<Body>> {
        let max_attempts = 1 + self.plan.retry.as_ref().map_or(0, |r| r.attempts);
        let mut last = None;
        for attempt in 0..max_attempts {
            let Some(this_body) = body.next() else { break };
            if attempt > 0 && !self.before_retry(attempt).await {
                break;
            }
            ledger.attempts = attempt + 1;
            let may_retry = attempt + 1 < max_attempts;
            // Fault injection, per attempt: an injected abort is an upstream
            // failure the retry policy may retry (a delay delays the attempt).
            if let Some(code) = self.fault().await {
                // Not sent: a streamed body is still whole.
                body.give_back(this_body);
                if may_retry && self.retryable(parts, &Outcome::Status(code)) {
                    continue;
                }
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return Err(LocalReply::new(
                    "fault_abort",
                    status,
                    "fault filter abort\n",
                ));
            }
            let replayable = body.replayable().is_some();
            match self
                .send(parts, this_body, may_retry, replayable, ledger)
                .await?
            {
                Tried::Final(response) => return Ok(response),
                Tried::Again(response) => last = response,
            }
        }
        last.ok_or_else(|| {
            LocalReply::new(
                "retries_exhausted",
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream unavailable\n",
            )
        })
    }

    /// Whether a retry may go: the service's retry budget allows it (it is
    /// then counted, and waits out its backoff).
    async fn before_retry(&self, attempt: u32) -> bool {
        if !self.service.try_retry() {
            debug!(component = "waypoint", "retry budget exhausted");
            return false;
        }
        count_for(&self.metrics.retries, self.plan.backend.label());
        let backoff = self.service.backoff(self.plan.retry.as_ref(), attempt);
        tokio::time::sleep(backoff).await;
        true
    }

    /// The service's fault injection for one attempt: waits out an injected
    /// delay, and returns the status of an injected abort.
    async fn fault(&self) -> Option<u16> {
        let fault = self.service.fault();
        if let Some(delay) = fault.delay {
            tokio::time::sleep(delay).await;
        }
        fault.abort
    }

    /// One attempt at an endpoint, with the per-try timeout.
    async fn send(
        &self,
        parts: &mut Parts,
        body: Body,
        may_retry: bool,
        replayable: bool,
        ledger: &mut Ledger,
    ) -> Stage<Tried> {
        let endpoints = self.snap.endpoints_of(&self.plan.backend);
        let Some((ep, _inflight)) = self.service.pick(&endpoints) else {
            return Err(LocalReply::new(
                "no_healthy_upstream",
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream\n",
            ));
        };
        ledger.upstream = Some(ep.clone());
        // The last attempt takes the head; earlier ones send a copy.
        let head = if may_retry {
            clone_head(parts)
        } else {
            std::mem::replace(parts, Request::new(()).into_parts().0)
        };
        let mut req = Request::from_parts(head, body);
        *req.version_mut() = match self.ctx.proto {
            Proto::Http1 => http::Version::HTTP_11,
            Proto::Http2 => http::Version::HTTP_2,
        };
        let sent = self.upstream.send(
            &ep,
            self.ctx.proto,
            req,
            &self.ctx.derived.tunnel,
            self.service.limits(),
        );
        let result = match self.plan.try_timeout {
            Some(t) => match tokio::time::timeout(t, sent).await {
                Ok(r) => r.map_err(AttemptError::Upstream),
                Err(_) => Err(AttemptError::Timeout),
            },
            None => sent.await.map_err(AttemptError::Upstream),
        };
        let outcome = match &result {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(e) => e.outcome(),
        };
        self.record(&ep, &outcome);
        // A streamed body is gone once sent; only a connect failure (which
        // sent nothing) may be retried with it.
        let retryable = may_retry
            && (replayable || matches!(outcome, Outcome::ConnectFailed))
            && self.retryable(parts, &outcome);
        match result {
            Ok(resp) if retryable => Ok(Tried::Again(Some(resp))),
            Ok(resp) => Ok(Tried::Final(resp)),
            Err(e) => {
                if let AttemptError::Upstream(UpstreamError::Overflow(limit)) = &e {
                    self.metrics.overflowed(self.plan.backend.label(), *limit);
                }
                self.metrics.failure(e.reason());
                debug!(component = "waypoint", endpoint = %ep.addr, error = %e, "upstream attempt failed");
                if retryable {
                    Ok(Tried::Again(None))
                } else {
                    Err(e.reply())
                }
            }
        }
    }

    fn retryable(&self, parts: &Parts, outcome: &Outcome) -> bool {
        self.service
            .is_retryable(&parts.method, outcome, self.plan.retry.as_ref())
    }

    /// Feeds outlier detection, counting an ejection it causes.
    fn record(&self, ep: &Endpoint, outcome: &Outcome) {
        if self.service.record(ep, outcome) {
            let service = self.plan.backend.label();
            info!(component = "outlier", endpoint = %ep.addr, service = %service, "endpoint ejected after consecutive failures");
            count_for(&self.metrics.ejections, service);
        }
    }
}

impl AttemptError {
    fn outcome(&self) -> Outcome {
        match self {
            AttemptError::Upstream(UpstreamError::Connect(..)) => Outcome::ConnectFailed,
            AttemptError::Upstream(UpstreamError::Reset(_)) => Outcome::Reset,
            // Turned away before sending: nothing the endpoint did.
            AttemptError::Upstream(UpstreamError::Overflow(_)) => Outcome::Overflow,
            AttemptError::Timeout => Outcome::Timeout,
        }
    }

    /// The `weft_upstream_failures_total` reason.
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Upstream(UpstreamError::Connect(..)) => "connect",
            AttemptError::Upstream(UpstreamError::Reset(_)) => "reset",
            AttemptError::Upstream(UpstreamError::Overflow(_)) => "overflow",
            AttemptError::Timeout => "timeout",
        }
    }

    /// The answer when no try is left.
    fn reply(&self) -> Box<LocalReply> {
        match self {
            AttemptError::Timeout => LocalReply::new(
                "upstream_timeout",
                StatusCode::GATEWAY_TIMEOUT,
                "upstream request timeout\n",
            ),
            AttemptError::Upstream(UpstreamError::Connect(..)) => LocalReply::new(
                "upstream_connect_failure",
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error\n",
            ),
            AttemptError::Upstream(UpstreamError::Reset(_)) => LocalReply::new(
                "upstream_reset",
                StatusCode::BAD_GATEWAY,
                "upstream reset before response\n",
            ),
            AttemptError::Upstream(UpstreamError::Overflow(_)) => LocalReply::new(
                "overflow",
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream overflow\n",
            )
            .with_header(OVERFLOW_HEADER, "true"),
        }
    }
}
