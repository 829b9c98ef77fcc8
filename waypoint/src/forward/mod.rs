//! One HTTP request through the waypoint, as a pipeline of stages (one file
//! each), and the path of a connection that is not HTTP.
//!
//! A request passes, in order: L7 authorization (`authorize`, 403),
//! routing (`crate::plan`: 404, 500, redirect), the backend service's
//! local rate limit and circuit breaker (`admit`, 429, 503), the upstream
//! head (`head`, `upgrade`), the body kept for replay (`replay`) and sent
//! to mirrors (`mirror`), the attempts with faults, retries and timeouts
//! (`attempts`, 503, 504), and is reported when its response ends
//! (`finish`). A stage either hands the request on or ends it with a local
//! reply (`reply`). A stage file never imports this one, and no two import
//! each other; the L4 path is `l4`.

mod admit;
mod attempts;
mod authorize;
mod finish;
mod head;
mod l4;
mod mirror;
mod replay;
mod reply;
mod upgrade;

use std::sync::Arc;

use http::request::Parts;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite};

use self::attempts::Attempts;
use self::finish::{finish, InFlight, Ledger, Reporters};
use self::replay::RequestBody;
use self::reply::{LocalReply, Stage};
use self::upgrade::Upgrade;
use crate::body::Body;
use crate::context::ConnCtx;
use crate::metrics::Metrics;
use crate::plan::{self, Plan, Verdict};
use crate::resilience::registry::Registry;
use crate::state::{Compiled, WaypointState};
use crate::telemetry::{AccessLog, SpanExporter};
use crate::upstream::Upstream;

/// What every request and L4 connection is forwarded with.
pub struct Forwarder {
    state: WaypointState,
    upstream: Arc<Upstream>,
    resilience: Registry,
    /// The Gateway's name: L7 policies may target the waypoint by it.
    waypoint: String,
    report: Reporters,
}

impl Forwarder {
    pub fn new(
        state: WaypointState,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        waypoint: String,
        access_log: AccessLog,
        spans: SpanExporter,
    ) -> Arc<Self> {
        Arc::new(Self {
            state,
            upstream,
            resilience: Registry::default(),
            waypoint,
            report: Reporters {
                metrics,
                access_log,
                spans,
            },
        })
    }

    pub fn state(&self) -> &WaypointState {
        &self.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.report.metrics
    }

    /// One request of the client connection `ctx`, against the model
    /// version current when it arrived.
    pub async fn handle(&self, ctx: &ConnCtx, req: Request<Incoming>) -> Response<Body> {
        let snap = self.state.load();
        let in_flight = InFlight::start(self.metrics(), &ctx.derived.service);
        let (mut parts, incoming) = req.into_parts();
        let mut ledger = Ledger::new(&parts);
        let response = match self
            .respond(&snap, ctx, &mut parts, incoming, &mut ledger)
            .await
        {
            Ok(response) => response,
            Err(reply) => {
                ledger.flag = reply.flag;
                reply.into_response(ledger.grpc)
            }
        };
        in_flight.answered();
        finish(&self.report, ctx, ledger, response)
    }

    /// The stages, in order.
    async fn respond(
        &self,
        snap: &Arc<Compiled>,
        ctx: &ConnCtx,
        parts: &mut Parts,
        incoming: Incoming,
        ledger: &mut Ledger,
    ) -> Stage<Response<Body>> {
        let metrics = self.metrics();
        authorize::request(
            &snap.authz,
            &self.waypoint,
            ctx,
            parts,
            metrics,
            &mut ledger.policy,
        )?;
        let plan = route(snap, ctx, parts, ledger)?;
        let service = self.resilience.for_backend(snap, &plan.backend);
        admit::rate_limit(
            &service,
            &plan.backend,
            &parts.headers,
            &ctx.derived.peer,
            metrics,
        )?;
        let _permit = admit::admit(&service, &plan.backend, metrics)?;

        let upgrade = Upgrade::take(parts, ctx.proto);
        head::prepare_upstream(parts, ctx, &plan, &ledger.trace);
        if let Some(u) = &upgrade {
            u.ask_upstream(parts);
        }
        let body = RequestBody::read(incoming, &ledger.request_bytes).await?;
        if let Some(bytes) = body.replayable() {
            mirror::spawn_all(
                &self.upstream,
                &self.resilience,
                snap,
                ctx,
                parts,
                bytes,
                plan.mirrors(),
            );
        }

        let attempts = Attempts {
            upstream: &self.upstream,
            metrics,
            snap,
            ctx,
            plan: &plan,
            service: &service,
        };
        let response = attempts.run(parts, body, ledger).await?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return upgrade::switch(response, upgrade);
        }
        let left = plan
            .request_timeout
            .map(|t| t.saturating_sub(ledger.start.elapsed()));
        Ok(head::shape_response(response, &plan, left))
    }

    /// A connection that is not HTTP: L4 policy, then bytes to an endpoint.
    pub async fn l4<S>(&self, ctx: ConnCtx, io: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let snap = self.state.load();
        if !authorize::connection(&snap.authz, &self.waypoint, &ctx, self.metrics()) {
            return;
        }
        let endpoints = snap.endpoints_of(&ctx.target);
        // The service's own resilience (balancer, ejections, limits), as
        // for its HTTP requests.
        let service = self.resilience.for_backend(&snap, &ctx.target);
        l4::carry(
            &self.upstream,
            self.metrics(),
            &service,
            &ctx,
            &endpoints,
            io,
        )
        .await
    }
}

/// Routing: the plan, or the answer the route gives itself (a redirect,
/// 404 with no route, 500 with no backend).
fn route<'s>(
    snap: &'s Compiled,
    ctx: &ConnCtx,
    parts: &Parts,
    ledger: &mut Ledger,
) -> Stage<Box<Plan<'s>>> {
    // The client's namespace as its certificate proves it: it selects
    // consumer routes, so a forged source address cannot.
    match plan::plan(snap, &ctx.target, &ctx.peer.namespace, parts) {
        Verdict::Forward(plan) => {
            ledger.route = plan.route.clone();
            Ok(plan)
        }
        Verdict::Respond {
            status,
            headers,
            flag,
            route,
        } => {
            ledger.route = route;
            Err(Box::new(LocalReply {
                flag,
                status,
                text: "",
                headers,
            }))
        }
    }
}
