//! The `weft.dev` TrafficPolicy in (retry budget, outlier detection,
//! connection limits, faults, rate limits for one Service), its model form
//! and status out. The waypoint applies it, so it is accepted only for a
//! Service that uses one.

use std::collections::BTreeSet;

use weft_api::crd;
use weft_api::model;

use super::cluster::{by_key, parse_duration_ms, ClusterState};
use super::policy_status::{status_for, unknown_namespace, PolicyKind, PolicyStatus};
use crate::reasons;

/// TrafficPolicies that convert as model entries; every one gets a
/// status (a bad value, a missing target, a target without a waypoint).
pub(crate) fn build_traffic_policies(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    services: &[model::Service],
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::TrafficPolicy> {
    const KIND: PolicyKind = PolicyKind::TrafficPolicy;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.traffic_policies) {
        if !known_ns.contains(ns.as_str()) {
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let converted = traffic_policy(&ns, &name, &p.spec);
        let target = &p.spec.target_ref;
        let status = match &converted {
            Err((reason, message)) => status_for(KIND, p, false, reason, message.clone()),
            Ok(_) => match services
                .iter()
                .find(|s| s.namespace == ns && s.name == target.name)
            {
                None => status_for(
                    KIND,
                    p,
                    false,
                    reasons::TARGET_NOT_FOUND,
                    format!("targetRef: Service {ns}/{} does not exist", target.name),
                ),
                Some(s) if s.waypoint.is_none() => status_for(
                    KIND,
                    p,
                    false,
                    reasons::NO_WAYPOINT,
                    format!(
                        "Service {ns}/{} does not use a waypoint, which is what applies this policy: label it or its namespace {}=<waypoint>",
                        target.name,
                        model::USE_WAYPOINT_LABEL
                    ),
                ),
                Some(_) => status_for(KIND, p, true, reasons::ACCEPTED, "applied".to_owned()),
            },
        };
        statuses.push(status);
        if let Ok(tp) = converted {
            out.push(tp);
        }
    }
    out
}

/// A TrafficPolicy spec in model form; `Err` is (reason, message).
fn traffic_policy(
    ns: &str,
    name: &str,
    spec: &crd::TrafficPolicySpec,
) -> Result<model::TrafficPolicy, (&'static str, String)> {
    let invalid = |m: String| (reasons::INVALID_VALUE, m);
    let duration =
        |field: &str, v: &str| parse_duration_ms(v).map_err(|e| invalid(format!("{field}: {e}")));
    let percent = |field: &str, v: u32| {
        if v > 100 {
            Err(invalid(format!("{field}: {v} is not a percentage (0-100)")))
        } else {
            Ok(v)
        }
    };
    let t = &spec.target_ref;
    if !matches!(t.group.as_deref(), None | Some("") | Some("core")) || t.kind != "Service" {
        return Err((
            reasons::INVALID_KIND,
            format!(
                "targetRef must be a Service, not {}/{}",
                t.group.as_deref().unwrap_or(""),
                t.kind
            ),
        ));
    }
    let retry_budget = match &spec.retry_budget {
        None => None,
        Some(b) => {
            let d = model::RetryBudget::default();
            Some(model::RetryBudget {
                percent: percent("retryBudget.percent", b.percent.unwrap_or(d.percent))?,
                min_retries_per_second: b
                    .min_retries_per_second
                    .unwrap_or(d.min_retries_per_second),
            })
        }
    };
    let outlier_detection = match &spec.outlier_detection {
        None => None,
        Some(o) => {
            let d = model::OutlierDetection::default();
            Some(model::OutlierDetection {
                consecutive_5xx: o.consecutive5xx.unwrap_or(d.consecutive_5xx),
                base_ejection_ms: match &o.base_ejection_time {
                    None => d.base_ejection_ms,
                    Some(v) => duration("outlierDetection.baseEjectionTime", v)?,
                },
                max_ejection_percent: percent(
                    "outlierDetection.maxEjectionPercent",
                    o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
                )?,
            })
        }
    };
    let limits = spec.limits.as_ref().map(|l| model::ConnectionLimits {
        max_connections: l.max_connections,
        max_pending_requests: l.max_pending_requests,
        max_requests: l.max_requests,
    });
    let fault = match &spec.fault {
        None => None,
        Some(f) => Some(model::Fault {
            delay: match &f.delay {
                None => None,
                Some(d) => Some(model::FaultDelay {
                    percent: percent("fault.delay.percent", d.percent)?,
                    delay_ms: duration("fault.delay.fixedDelay", &d.fixed_delay)?,
                }),
            },
            abort: match &f.abort {
                None => None,
                Some(a) => {
                    if !(200..=599).contains(&a.http_status) {
                        return Err(invalid(format!(
                            "fault.abort.httpStatus: {} is not an HTTP status (200-599)",
                            a.http_status
                        )));
                    }
                    Some(model::FaultAbort {
                        percent: percent("fault.abort.percent", a.percent)?,
                        status: a.http_status,
                    })
                }
            },
        }),
    };
    let rate_limit = match &spec.rate_limit {
        None => None,
        Some(r) => {
            let period_ms = duration("rateLimit.period", &r.period)?;
            if period_ms == 0 {
                return Err(invalid("rateLimit.period must be longer than 0".to_owned()));
            }
            let key = match &r.key {
                None => model::RateLimitKey::Global,
                Some(k) => match (k.type_, &k.header) {
                    (crd::RateLimitKeyType::Global, _) => model::RateLimitKey::Global,
                    (crd::RateLimitKeyType::ClientIdentity, _) => {
                        model::RateLimitKey::ClientIdentity
                    }
                    (crd::RateLimitKeyType::Header, Some(h)) if !h.is_empty() => {
                        model::RateLimitKey::Header(h.clone())
                    }
                    (crd::RateLimitKeyType::Header, _) => {
                        return Err(invalid(
                            "rateLimit.key: type Header needs the header name in `header`"
                                .to_owned(),
                        ))
                    }
                },
            };
            Some(model::RateLimit {
                requests: r.requests,
                period_ms,
                burst: r.burst,
                key,
            })
        }
    };
    Ok(model::TrafficPolicy {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        target: t.name.clone(),
        retry_budget,
        outlier_detection,
        limits,
        fault,
        rate_limit,
    })
}
