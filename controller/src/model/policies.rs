//! AuthorizationPolicy and PeerAuthentication in, their model form and
//! status out. A policy the data plane could not enforce as written is
//! kept in a form that fails closed and reported, never silently widened.

use std::collections::BTreeSet;
use std::net::IpAddr;

use weft_api::crd::{self, WorkloadSelector};
use weft_api::model::{self, Labels};

use super::cluster::{by_key, ClusterState};
use super::policy_status::{status_for, unknown_namespace, PolicyKind, PolicyStatus};
use crate::reasons;

fn selector_labels(sel: &Option<WorkloadSelector>) -> Option<Labels> {
    sel.as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty())
}

/// Whether `block` is a CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare address,
/// as ztunnel's `rbac::cidr_contains` reads it.
fn valid_ip_block(block: &str) -> bool {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => match l.parse::<u8>() {
            Ok(l) => (a, Some(l)),
            Err(_) => return false,
        },
        None => (block, None),
    };
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => len.is_none_or(|l| l <= 32),
        Ok(IpAddr::V6(_)) => len.is_none_or(|l| l <= 128),
        Err(_) => false,
    }
}

/// AuthorizationPolicies as model policies, each with its status: invalid
/// IP blocks fail closed, targets must exist and use a waypoint, HTTP
/// fields without targets are flagged (only a waypoint enforces them).
pub(crate) fn build_authorization_policies(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    services: &[model::Service],
    waypoints: &[model::Waypoint],
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::AuthorizationPolicy> {
    const KIND: PolicyKind = PolicyKind::AuthorizationPolicy;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.authorization_policies) {
        if !known_ns.contains(ns.as_str()) {
            tracing::warn!(component = "model_builder", kind = %KIND, namespace = %ns, name = %name, "policy names a namespace that does not exist; ignored");
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let action = match p.spec.action {
            crd::PolicyAction::Allow => model::PolicyAction::Allow,
            crd::PolicyAction::Deny => model::PolicyAction::Deny,
        };
        let mut invalid_blocks = Vec::new();
        let mut has_l7 = false;
        let rules = p
            .spec
            .rules
            .iter()
            .map(|r| model::Rule {
                from: r
                    .from
                    .iter()
                    .map(|f| {
                        let mut ip_blocks = Vec::new();
                        for b in &f.source.ip_blocks {
                            if valid_ip_block(b) {
                                ip_blocks.push(b.clone());
                            } else {
                                invalid_blocks.push(b.clone());
                                // ztunnel reads a malformed block as matching
                                // nothing: right for ALLOW (fail closed), wrong
                                // for DENY, where it must match everything.
                                match action {
                                    model::PolicyAction::Allow => ip_blocks.push(b.clone()),
                                    model::PolicyAction::Deny => {
                                        ip_blocks.push("0.0.0.0/0".to_owned());
                                        ip_blocks.push("::/0".to_owned());
                                    }
                                }
                            }
                        }
                        model::Source {
                            principals: f.source.principals.clone(),
                            namespaces: f.source.namespaces.clone(),
                            ip_blocks,
                        }
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| {
                        let d = model::Destination {
                            ports: t.operation.ports.clone(),
                            methods: t.operation.methods.clone(),
                            paths: t.operation.paths.clone(),
                            headers: t.operation.headers.clone(),
                        };
                        has_l7 |= d.has_l7_fields();
                        d
                    })
                    .collect(),
            })
            .collect();
        let targets: Vec<model::PolicyTarget> = p
            .spec
            .target_refs
            .iter()
            .map(|t| model::PolicyTarget {
                kind: match t.kind {
                    crd::PolicyTargetKind::Service => model::ParentKind::Service,
                    crd::PolicyTargetKind::Gateway => model::ParentKind::Gateway,
                },
                name: t.name.clone(),
            })
            .collect();
        let target_problem = targets.iter().find_map(|t| match t.kind {
            model::ParentKind::Service => {
                match services.iter().find(|s| s.namespace == ns && s.name == t.name) {
                    None => Some((
                        reasons::TARGET_NOT_FOUND,
                        format!("targetRefs: Service {ns}/{} does not exist", t.name),
                    )),
                    Some(s) if s.waypoint.is_none() => Some((
                        reasons::NO_WAYPOINT,
                        format!(
                            "targetRefs: Service {ns}/{} does not use a waypoint, so nothing enforces this policy for it: label it or its namespace {}=<waypoint>",
                            t.name,
                            model::USE_WAYPOINT_LABEL
                        ),
                    )),
                    Some(_) => None,
                }
            }
            model::ParentKind::Gateway => (!waypoints
                .iter()
                .any(|w| w.namespace == ns && w.name == t.name))
            .then(|| {
                (
                    reasons::TARGET_NOT_FOUND,
                    format!(
                        "targetRefs: namespace {ns} has no Gateway {:?} of class {}",
                        t.name,
                        crd::WAYPOINT_GATEWAY_CLASS
                    ),
                )
            }),
        });
        let status = if !invalid_blocks.is_empty() {
            let effect = match action {
                model::PolicyAction::Allow => "allow nothing",
                model::PolicyAction::Deny => "deny every source address",
            };
            status_for(
                KIND,
                p,
                false,
                reasons::INVALID_IP_BLOCK,
                format!(
                    "ipBlocks {} are not CIDRs (like 10.0.0.0/8 or fd00::/8) or addresses; until fixed they {effect} (fail closed)",
                    invalid_blocks.join(", ")
                ),
            )
        } else if let Some((reason, message)) = target_problem {
            status_for(KIND, p, false, reason, message)
        } else if !targets.is_empty() {
            // The waypoint enforces every field, HTTP ones included.
            status_for(
                KIND,
                p,
                true,
                reasons::ACCEPTED,
                "applied by the waypoint of its targets".to_owned(),
            )
        } else if has_l7 {
            status_for(
                KIND,
                p,
                true,
                reasons::L7_FIELDS_FAIL_CLOSED,
                "rules name HTTP fields (methods, paths, headers) that only a waypoint can enforce; \
                 ztunnel fails closed on them (an ALLOW rule matches nothing, a DENY rule matches \
                 on its L4 fields alone): set targetRefs to the Service or waypoint Gateway so \
                 the waypoint enforces it"
                    .to_owned(),
            )
        } else {
            status_for(KIND, p, true, reasons::ACCEPTED, "applied".to_owned())
        };
        statuses.push(status);
        out.push(model::AuthorizationPolicy {
            name,
            namespace: ns,
            selector: selector_labels(&p.spec.selector),
            action,
            rules,
            targets,
        });
    }
    out
}

/// PeerAuthentications with an mTLS mode as model entries, each with its
/// status; one without a mode leaves the namespace-wide setting in force.
pub(crate) fn build_peer_authentications(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::PeerAuthentication> {
    const KIND: PolicyKind = PolicyKind::PeerAuthentication;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.peer_authentications) {
        if !known_ns.contains(ns.as_str()) {
            tracing::warn!(component = "model_builder", kind = %KIND, namespace = %ns, name = %name, "peer authentication names a namespace that does not exist; ignored");
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let mode = p.spec.mtls.as_ref().and_then(|m| m.mode);
        let Some(mode) = mode else {
            // No mode: inherit, which is what leaving it out of the model does.
            statuses.push(status_for(
                KIND,
                p,
                true,
                reasons::ACCEPTED,
                "no mtls.mode: the namespace-wide setting applies".to_owned(),
            ));
            continue;
        };
        statuses.push(status_for(
            KIND,
            p,
            true,
            reasons::ACCEPTED,
            "applied".to_owned(),
        ));
        out.push(model::PeerAuthentication {
            name,
            namespace: ns,
            selector: selector_labels(&p.spec.selector),
            mode: match mode {
                crd::MtlsMode::Strict => model::MtlsMode::Strict,
                crd::MtlsMode::Permissive => model::MtlsMode::Permissive,
            },
        });
    }
    out
}
