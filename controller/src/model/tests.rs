//! The builder end to end, part by part: cluster objects in, the model
//! and status [`build`] makes of them out.

use std::sync::Arc;

use super::*;
use crate::reasons;

fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> Arc<T> {
    Arc::new(serde_yaml::from_str(yaml).unwrap())
}

/// Workloads, Services and policies of a plain mesh (`core`, `policies`).
mod mesh {
    use std::net::IpAddr;

    use weft_api::model;

    use super::*;

    fn state() -> ClusterState {
        ClusterState {
            namespaces: vec![
                obj("metadata: {name: shop, labels: {weft.dev/dataplane-mode: ambient}}"),
                obj("metadata: {name: legacy}"),
            ],
            pods: vec![
                obj(r#"
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
"#),
                obj("metadata: {name: pending, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Pending}"),
                obj("metadata: {name: done, namespace: shop}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Succeeded, podIPs: [{ip: 10.0.0.9}]}"),
                obj("metadata: {name: old, namespace: legacy}\nspec: {nodeName: n2, containers: []}\nstatus: {podIP: 10.0.1.3}"),
            ],
            services: vec![obj(r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 9000, targetPort: 9001}, {name: x, port: 81}]
"#)],
            ..Default::default()
        }
    }

    /// A named targetPort comes from the Service's own EndpointSlice when
    /// there is one (the EndpointSlice controller resolved it), and a
    /// Service selects pods of its own namespace only.
    #[test]
    fn named_target_ports_come_from_the_services_own_slices() {
        let mut st = state();
        st.services.push(obj(r#"
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: web}, ports: [{name: grpc, port: 90, targetPort: grpc}]}
"#));
        st.endpoint_slices = vec![
            obj("metadata: {name: api-x1, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: []
ports: [{name: grpc, port: 7070}]"),
            // Another Service's slice, and one of a namesake in another
            // namespace: neither is api's.
            obj("metadata: {name: web-x1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints: []
ports: [{name: grpc, port: 1111}]"),
            obj("metadata: {name: api-y1, namespace: legacy, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
endpoints: []
ports: [{name: grpc, port: 2222}]"),
        ];
        // A pod of another namespace with the same labels is not selected.
        st.pods.push(obj(r#"
metadata: {name: web-9, namespace: legacy, labels: {app: web}}
spec: {nodeName: n2, containers: [{name: c, ports: [{name: grpc, containerPort: 3333}]}]}
status: {phase: Running, podIP: 10.0.1.9}
"#));
        let out = build(&st, "cluster.local");
        let api = out.model.services.iter().find(|s| s.name == "api").unwrap();
        assert_eq!(api.ports[0].target_port, Some(7070));
        st.endpoint_slices.remove(0);
        let out = build(&st, "cluster.local");
        let api = out.model.services.iter().find(|s| s.name == "api").unwrap();
        // No slice of its own, and its namespace's pods do not declare
        // `grpc`: the service port is used (and reported).
        assert_eq!(api.ports[0].target_port, None);
        assert!(out.problems.iter().any(|p| p.contains("service shop/api")));
    }

    #[test]
    fn builds_workloads_and_services() {
        let out = build(&state(), "cluster.local");
        let m = &out.model;
        let names: Vec<&str> = m.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["old", "web-1"]);
        let w = &m.workloads[1];
        assert_eq!(w.service_account, "web");
        assert_eq!(w.uid, "u1");
        assert_eq!(w.ips.len(), 2);
        assert!(m.is_captured(w));
        assert!(!m.is_captured(&m.workloads[0]));
        assert_eq!(m.workloads[0].service_account, "default");
        let s = &m.services[0];
        assert_eq!(s.vips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.ports,
            [
                model::ServicePort {
                    port: 80,
                    target_port: Some(8080)
                },
                model::ServicePort {
                    port: 9000,
                    target_port: Some(9001)
                },
                model::ServicePort {
                    port: 81,
                    target_port: None
                },
            ]
        );
        m.validate().unwrap();
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn probe_ports_come_from_the_pod_spec() {
        let pod: Arc<k8s_openapi::api::core::v1::Pod> = obj(r#"
metadata: {name: app, namespace: shop}
spec:
  nodeName: n1
  containers:
  - name: web
    ports: [{name: health, containerPort: 8081}, {name: http, containerPort: 8080}]
    livenessProbe: {httpGet: {path: /live, port: health}}
    readinessProbe: {tcpSocket: {port: 8080}}
    startupProbe: {exec: {command: [true]}}
  - name: rpc
    livenessProbe: {grpc: {port: 9090}}
    readinessProbe: {httpGet: {path: /ready, port: missing}}
status: {phase: Running, podIP: 10.0.0.7}
"#);
        let mut problems = std::collections::BTreeSet::new();
        let ports =
            crate::model::core::probe_ports(pod.spec.as_ref().unwrap(), "shop/app", &mut problems);
        assert_eq!(ports, [8080, 8081, 9090]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems.iter().next().unwrap().contains("\"missing\""),
            "{problems:?}"
        );

        let many: Vec<String> = (1..=10)
            .map(|i| {
                format!(
                    "{{name: c{i}, livenessProbe: {{tcpSocket: {{port: {}}}}}}}",
                    9000 + i
                )
            })
            .collect();
        let pod: Arc<k8s_openapi::api::core::v1::Pod> = obj(&format!(
            "metadata: {{name: many, namespace: shop}}\nspec: {{containers: [{}]}}",
            many.join(", ")
        ));
        let mut problems = std::collections::BTreeSet::new();
        let ports =
            crate::model::core::probe_ports(pod.spec.as_ref().unwrap(), "shop/many", &mut problems);
        assert_eq!(ports.len(), model::MAX_PROBE_PORTS);
        assert_eq!(ports[0], 9001);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    #[test]
    fn policies_get_status() {
        let mut st = state();
        st.authorization_policies = vec![
            obj("metadata: {name: l7, namespace: shop, generation: 3}\nspec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}"),
            obj("metadata: {name: ghost, namespace: nowhere}\nspec: {action: DENY}"),
            obj("metadata: {name: bad, namespace: shop}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/40, 10.1.0.0/16]}}]}]}"),
        ];
        st.peer_authentications = vec![obj(
            "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}",
        )];
        let out = build(&st, "cluster.local");
        let got: Vec<(&str, bool, &str)> = out
            .policy_status
            .iter()
            .map(|s| (s.name.as_str(), s.accepted, s.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("ghost", false, reasons::UNKNOWN_NAMESPACE),
                ("bad", false, reasons::INVALID_IP_BLOCK),
                ("l7", true, reasons::L7_FIELDS_FAIL_CLOSED),
                ("strict", true, reasons::ACCEPTED),
            ]
        );
        assert_eq!(out.policy_status[2].observed_generation, Some(3));
        assert!(out.policy_status[2].message.contains("waypoint"));
        let names: Vec<&str> = out.model.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bad", "l7"]);
        // The invalid block of a DENY becomes "every address" (fail closed).
        assert_eq!(
            out.model.policies[0].rules[0].from[0].ip_blocks,
            ["0.0.0.0/0", "::/0", "10.1.0.0/16"]
        );
        assert_eq!(
            out.model.peer_authentications[0].mode,
            model::MtlsMode::Strict
        );
    }

    #[test]
    fn output_is_deterministic() {
        let a = state();
        let mut b = state();
        b.pods.reverse();
        b.namespaces.reverse();
        assert_eq!(build(&a, "td"), build(&b, "td"));
    }
}

/// A namespace behind a waypoint (`gateway_api`, `traffic`, targeted
/// policies).
mod waypoints {
    use weft_api::{crd, model};

    use super::*;
    use crate::model::gateway_api::{Cond, RouteKind, RouteParentStatus, WaypointDeployment};

    fn svc(name: &str, ip: &str, labels: &str) -> Arc<k8s_openapi::api::core::v1::Service> {
        obj(&format!(
            "metadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\nspec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{port: 80, targetPort: 8080}}]}}"
        ))
    }

    /// Namespace `shop` sends its traffic through waypoint `wp`.
    fn state() -> ClusterState {
        ClusterState {
            namespaces: vec![obj(
                "metadata: {name: shop, labels: {weft.dev/dataplane-mode: ambient, weft.dev/use-waypoint: wp}}",
            )],
            services: vec![
                svc("web", "10.96.0.10", ""),
                svc("db", "10.96.0.11", "weft.dev/use-waypoint: none"),
                svc("api", "10.96.0.12", "weft.dev/use-waypoint: elsewhere"),
                svc("web-v2", "10.96.0.13", ""),
                svc("wp", "10.96.0.99", "gateway.networking.k8s.io/gateway-name: wp"),
            ],
            gateways: vec![
                obj("metadata: {name: wp, namespace: shop, uid: gw-uid, generation: 2, annotations: {weft.dev/waypoint-replicas: '3'}}\nspec: {gatewayClassName: weft-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}"),
                obj("metadata: {name: edge, namespace: shop, uid: e}\nspec: {gatewayClassName: other, listeners: []}"),
            ],
            ..Default::default()
        }
    }

    fn route(yaml_rules: &str, parent: &str) -> Arc<crd::HTTPRoute> {
        obj(&format!(
            "metadata: {{name: r, namespace: shop, generation: 4, creationTimestamp: '2024-05-01T10:00:00Z'}}\nspec:\n  parentRefs: [{parent}]\n  rules:\n{yaml_rules}"
        ))
    }

    fn cond<'a>(p: &'a RouteParentStatus, type_: &str) -> Option<&'a Cond> {
        p.conditions.iter().find(|c| c.type_ == type_)
    }

    #[test]
    fn waypoints_and_use_waypoint_inheritance() {
        let out = build(&state(), "cluster.local");
        let m = &out.model;
        assert_eq!(
            m.waypoints,
            [model::Waypoint {
                name: "wp".into(),
                namespace: "shop".into(),
                service_account: "wp".into(),
            }]
        );
        let wp_of = |n: &str| {
            m.services
                .iter()
                .find(|s| s.name == n)
                .unwrap()
                .waypoint
                .clone()
        };
        assert_eq!(
            wp_of("web").as_deref(),
            Some("wp"),
            "inherited from the namespace"
        );
        assert_eq!(wp_of("db"), None, "`none` opts out");
        assert_eq!(wp_of("wp"), None, "a waypoint does not go through itself");
        // A missing waypoint is kept (fail closed) and reported.
        assert_eq!(wp_of("api").as_deref(), Some("elsewhere"));
        assert!(
            out.problems
                .iter()
                .any(|p| p.contains("service api") && p.contains("no Gateway \"elsewhere\"")),
            "{:?}",
            out.problems
        );
        assert!(!out.problems.iter().any(|p| p.contains("service db")));
    }

    #[test]
    fn http_route_converts_with_durations_filters_and_status() {
        let mut st = state();
        st.http_routes = vec![route(
            r#"
    - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-v, value: "2"}], method: get}]
      filters:
        - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: a, value: b}], remove: [c]}}
        - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
      backendRefs: [{name: web-v2, port: 80, weight: 90}, {name: ghost, port: 80, weight: 10}]
      timeouts: {request: 10s, backendRequest: 500ms}
      retry: {codes: [503], attempts: 2, backoff: 100ms}
    - backendRefs: [{name: web, port: 80}]
      timeouts: {request: 10 seconds}
    - backendRefs: [{group: example.com, kind: Bucket, name: b}]
"#,
            "{group: '', kind: Service, name: web, port: 80}",
        )];
        let out = build(&st, "cluster.local");
        let r = &out.model.http_routes[0];
        assert_eq!(r.created, "2024-05-01T10:00:00Z");
        assert_eq!(
            r.parents,
            [model::ParentRef {
                kind: model::ParentKind::Service,
                namespace: String::new(),
                name: "web".into(),
                port: Some(80),
            }]
        );
        assert_eq!(r.rules.len(), 2, "the rule with a bad duration is dropped");
        let rule = &r.rules[0];
        assert_eq!(
            rule.matches[0].path,
            Some(model::PathMatch::PathPrefix("/api".into()))
        );
        assert_eq!(rule.matches[0].method.as_deref(), Some("GET"));
        assert_eq!(
            rule.timeouts,
            Some(model::Timeouts {
                request_ms: Some(10_000),
                backend_request_ms: Some(500)
            })
        );
        let retry = rule.retry.as_ref().unwrap();
        assert_eq!(
            (retry.codes.as_slice(), retry.attempts, retry.backoff_ms),
            (&[503u16][..], 2, Some(100))
        );
        assert_eq!(rule.filters.len(), 2);
        assert!(matches!(
            &rule.filters[1],
            model::HttpFilter::UrlRewrite(model::UrlRewrite { path: Some(model::PathModifier::ReplacePrefixMatch(p)), .. }) if p == "/v2"
        ));
        // A missing backend stays (its share answers 500); a non-Service is dropped.
        let names: Vec<(&str, u32)> = rule
            .backends
            .iter()
            .map(|b| (b.backend.name.as_str(), b.weight))
            .collect();
        assert_eq!(names, [("web-v2", 90), ("ghost", 10)]);
        assert!(r.rules[1].backends.is_empty());

        let status = &out.gateway_api.routes[0];
        assert_eq!(
            (status.kind, status.observed_generation),
            (RouteKind::HTTPRoute, Some(4))
        );
        let p = &status.parents[0];
        let accepted = cond(p, reasons::ACCEPTED).unwrap();
        assert!(accepted.status);
        let resolved = cond(p, reasons::RESOLVED_REFS).unwrap();
        assert!(!resolved.status);
        assert_eq!(resolved.reason, reasons::BACKEND_NOT_FOUND);
        assert!(resolved.message.contains("shop/ghost") && resolved.message.contains("Bucket"));
        let partial = cond(p, reasons::PARTIALLY_INVALID).unwrap();
        assert!(partial.message.contains("rule 1") && partial.message.contains("timeouts.request"));
        assert!(out
            .problems
            .iter()
            .any(|p| p.contains("HTTPRoute shop/r rule 1")));
    }

    #[test]
    fn redirect_status_codes_core_and_extended() {
        let mut st = state();
        st.http_routes = vec![route(
            r#"
    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 308, scheme: https}}]
    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 303}}]
    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 305}}]
"#,
            "{group: '', kind: Service, name: web, port: 80}",
        )];
        let out = build(&st, "cluster.local");
        let codes: Vec<Option<u16>> = out.model.http_routes[0]
            .rules
            .iter()
            .map(|r| match &r.filters[0] {
                model::HttpFilter::RequestRedirect(rr) => rr.status_code,
                other => panic!("not a redirect: {other:?}"),
            })
            .collect();
        assert_eq!(codes, [Some(308), Some(303)], "305 is no redirect code");
        let partial = cond(
            &out.gateway_api.routes[0].parents[0],
            reasons::PARTIALLY_INVALID,
        )
        .unwrap();
        assert!(
            partial.message.contains("rule 2") && partial.message.contains("305"),
            "{}",
            partial.message
        );
    }

    #[test]
    fn route_parents_without_a_waypoint_are_not_matched() {
        let mut st = state();
        st.http_routes = vec![
            route("    - backendRefs: [{name: db, port: 80}]\n", "{kind: Service, group: '', name: db}"),
            obj("metadata: {name: ghost-parent, namespace: shop}\nspec: {parentRefs: [{kind: Service, group: '', name: nope}], rules: []}"),
            obj("metadata: {name: other-gw, namespace: shop}\nspec: {parentRefs: [{name: edge}], rules: []}"),
            obj("metadata: {name: to-wp, namespace: shop}\nspec: {parentRefs: [{name: wp}], rules: [{backendRefs: [{kind: Pod, name: p}]}]}"),
            obj("metadata: {name: far, namespace: other}\nspec: {parentRefs: [{name: wp, namespace: shop}], rules: []}"),
        ];
        let out = build(&st, "cluster.local");
        let names: Vec<&str> = out
            .model
            .http_routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["to-wp"]);
        let by_name = |n: &str| out.gateway_api.routes.iter().find(|r| r.name == n);
        let accepted = |n: &str| {
            cond(&by_name(n).unwrap().parents[0], reasons::ACCEPTED)
                .unwrap()
                .clone()
        };
        let a = accepted("r");
        assert_eq!(
            (a.status, a.reason.as_str()),
            (false, reasons::NO_MATCHING_PARENT)
        );
        assert!(a.message.contains("does not use a waypoint"));
        assert!(accepted("ghost-parent").message.contains("does not exist"));
        assert!(
            by_name("other-gw").is_none(),
            "another class's Gateway: not our status to write"
        );
        assert_eq!(accepted("far").reason, reasons::NOT_ALLOWED_BY_LISTENERS);
        let resolved = cond(
            &by_name("to-wp").unwrap().parents[0],
            reasons::RESOLVED_REFS,
        )
        .unwrap();
        assert_eq!(resolved.reason, reasons::INVALID_KIND);
        assert_eq!(
            out.model.http_routes[0].parents[0].kind,
            model::ParentKind::Gateway
        );
    }

    #[test]
    fn consumer_routes_may_send_to_their_parent_service_only() {
        let mut st = state();
        st.namespaces.push(obj(
            "metadata: {name: front, labels: {weft.dev/dataplane-mode: ambient}}",
        ));
        st.http_routes = vec![
            obj("metadata: {name: mine, namespace: front}\nspec: {parentRefs: [{group: '', kind: Service, name: web, namespace: shop}], rules: [{backendRefs: [{name: web, namespace: shop, port: 80}]}]}"),
            obj("metadata: {name: sneaky, namespace: front}\nspec: {parentRefs: [{group: '', kind: Service, name: web, namespace: shop}], rules: [{backendRefs: [{name: web-v2, namespace: shop, port: 80}]}]}"),
        ];
        let out = build(&st, "cluster.local");
        let by_name = |n: &str| out.gateway_api.routes.iter().find(|r| r.name == n).unwrap();
        let resolved = |n: &str| {
            cond(&by_name(n).parents[0], reasons::RESOLVED_REFS)
                .unwrap()
                .clone()
        };
        assert!(resolved("mine").status, "{:?}", resolved("mine"));
        let r = resolved("sneaky");
        assert_eq!(
            (r.status, r.reason.as_str()),
            (false, reasons::REF_NOT_PERMITTED)
        );
        let mine = out
            .model
            .http_routes
            .iter()
            .find(|r| r.name == "mine")
            .unwrap();
        assert_eq!(mine.parents[0].namespace, "shop");
        assert_eq!(
            mine.rules[0].backends[0].backend,
            model::BackendRef {
                name: "web".into(),
                namespace: "shop".into(),
                port: 80
            }
        );
        let sneaky = out
            .model
            .http_routes
            .iter()
            .find(|r| r.name == "sneaky")
            .unwrap();
        assert!(
            sneaky.rules[0].backends.is_empty(),
            "the other Service is not sent to"
        );
    }

    #[test]
    fn grpc_route_converts() {
        let mut st = state();
        st.grpc_routes = vec![obj(r#"
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
    - matches: [{method: {service: shop.Cart, method: Add}, headers: [{type: RegularExpression, name: x, value: "a.*"}]}]
      filters: [{type: RequestMirror, requestMirror: {backendRef: {name: web-v2, port: 80}, fraction: {numerator: 1, denominator: 4}}}]
      backendRefs: [{name: web, port: 80}]
    - filters: [{type: RequestRedirect, requestRedirect: {statusCode: 301}}]
"#)];
        let out = build(&st, "cluster.local");
        let g = &out.model.grpc_routes[0];
        assert_eq!(g.rules.len(), 1, "redirects are not gRPC");
        let m = g.rules[0].matches[0].method.as_ref().unwrap();
        assert_eq!(
            (m.service.as_str(), m.method.as_str()),
            ("shop.Cart", "Add")
        );
        assert_eq!(
            g.rules[0].matches[0].headers[0].kind,
            model::MatchType::RegularExpression
        );
        assert!(matches!(
            &g.rules[0].filters[0],
            model::HttpFilter::RequestMirror(model::RequestMirror { percent: Some(25), backend }) if backend.name == "web-v2"
        ));
        assert_eq!(out.gateway_api.routes[0].kind, RouteKind::GRPCRoute);
    }

    #[test]
    fn traffic_policy_converts_and_bad_ones_are_rejected() {
        let mut st = state();
        st.traffic_policies = vec![
            obj(r#"
metadata: {name: resilient, namespace: shop}
spec:
  targetRef: {kind: Service, name: web}
  retryBudget: {percent: 30}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 10s}
  limits: {maxRequests: 100}
  fault: {delay: {percent: 10, fixedDelay: 250ms}, abort: {percent: 5, httpStatus: 503}}
  rateLimit: {requests: 100, period: 1s, key: {type: Header, header: x-user}}
"#),
            obj("metadata: {name: bad, namespace: shop}\nspec: {targetRef: {kind: Service, name: web}, rateLimit: {requests: 1, period: 1sec}}"),
            obj("metadata: {name: nowp, namespace: shop}\nspec: {targetRef: {kind: Service, name: db}}"),
        ];
        let out = build(&st, "cluster.local");
        let tp: Vec<&model::TrafficPolicy> = out.model.traffic_policies.iter().collect();
        assert_eq!(tp.len(), 2);
        let r = tp.iter().find(|t| t.name == "resilient").unwrap();
        assert_eq!(r.target, "web");
        assert_eq!(r.retry_budget.as_ref().unwrap().percent, 30);
        assert_eq!(r.retry_budget.as_ref().unwrap().min_retries_per_second, 10);
        let od = r.outlier_detection.as_ref().unwrap();
        assert_eq!(
            (
                od.consecutive_5xx,
                od.base_ejection_ms,
                od.max_ejection_percent
            ),
            (3, 10_000, 50)
        );
        assert_eq!(
            r.fault.as_ref().unwrap().delay.as_ref().unwrap().delay_ms,
            250
        );
        let rl = r.rate_limit.as_ref().unwrap();
        assert_eq!(
            (rl.period_ms, &rl.key),
            (1000, &model::RateLimitKey::Header("x-user".into()))
        );
        let status: Vec<(&str, bool, &str)> = out
            .policy_status
            .iter()
            .filter(|s| s.kind == PolicyKind::TrafficPolicy)
            .map(|s| (s.name.as_str(), s.accepted, s.reason.as_str()))
            .collect();
        assert_eq!(
            status,
            [
                ("bad", false, reasons::INVALID_VALUE),
                ("nowp", false, reasons::NO_WAYPOINT),
                ("resilient", true, reasons::ACCEPTED),
            ]
        );
    }

    #[test]
    fn targeted_authorization_policy_is_enforced_by_the_waypoint() {
        let mut st = state();
        st.authorization_policies = vec![
            obj("metadata: {name: l7, namespace: shop}\nspec: {targetRefs: [{kind: Service, name: web}, {kind: Gateway, name: wp}], rules: [{to: [{operation: {methods: [GET], headers: {x-team: [blue]}}}]}]}"),
            obj("metadata: {name: untargeted, namespace: shop}\nspec: {rules: [{to: [{operation: {paths: [/a]}}]}]}"),
            obj("metadata: {name: bypassed, namespace: shop}\nspec: {targetRefs: [{kind: Service, name: db}]}"),
        ];
        let out = build(&st, "cluster.local");
        let status: Vec<(&str, bool, &str)> = out
            .policy_status
            .iter()
            .map(|s| (s.name.as_str(), s.accepted, s.reason.as_str()))
            .collect();
        assert_eq!(
            status,
            [
                ("bypassed", false, reasons::NO_WAYPOINT),
                ("l7", true, reasons::ACCEPTED),
                ("untargeted", true, reasons::L7_FIELDS_FAIL_CLOSED),
            ]
        );
        let l7 = out.model.policies.iter().find(|p| p.name == "l7").unwrap();
        assert_eq!(
            l7.targets,
            [
                model::PolicyTarget {
                    kind: model::ParentKind::Service,
                    name: "web".into()
                },
                model::PolicyTarget {
                    kind: model::ParentKind::Gateway,
                    name: "wp".into()
                },
            ]
        );
        assert_eq!(l7.rules[0].to[0].headers["x-team"], ["blue"]);
    }

    #[test]
    fn gateway_status_follows_waypoint_pods_and_deployments_follow_gateways() {
        let mut st = state();
        let out = build(&st, "cluster.local");
        let g = &out.gateway_api.gateways;
        assert_eq!(g.len(), 1, "only waypoint Gateways");
        assert_eq!(g[0].observed_generation, Some(2));
        assert!(g[0].conditions[0].status);
        assert_eq!(
            (
                g[0].conditions[1].status,
                g[0].conditions[1].reason.as_str()
            ),
            (false, reasons::NO_RESOURCES)
        );
        assert_eq!(g[0].addresses, ["10.96.0.99"]);
        assert_eq!(
            out.gateway_api.deployments,
            [WaypointDeployment {
                namespace: "shop".into(),
                name: "wp".into(),
                uid: "gw-uid".into(),
                replicas: 3,
            }]
        );

        st.pods = vec![obj(
            "metadata: {name: wp-1, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: wp}}\nspec: {nodeName: n1, serviceAccountName: wp, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.50, conditions: [{type: Ready, status: 'False'}]}",
        )];
        let out = build(&st, "cluster.local");
        assert_eq!(
            out.gateway_api.gateways[0].conditions[1].reason,
            reasons::PENDING
        );
        Arc::make_mut(&mut st.pods[0])
            .status
            .as_mut()
            .unwrap()
            .conditions = None;
        let out = build(&st, "cluster.local");
        let programmed = &out.gateway_api.gateways[0].conditions[1];
        assert_eq!(
            (programmed.status, programmed.reason.as_str()),
            (true, reasons::PROGRAMMED)
        );
        assert!(out.model.workloads.iter().any(|w| w.name == "wp-1"));

        // A waypoint replica being deleted leaves the model (ztunnels stop
        // choosing it while it drains); another pod being deleted stays
        // until it stops running.
        st.pods.push(obj(
            "metadata: {name: app, namespace: shop, deletionTimestamp: '2026-12-02T00:00:00Z'}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Running, podIP: 10.0.0.51}",
        ));
        Arc::make_mut(&mut st.pods[0]).metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-12-02T00:00:00Z".parse().unwrap(),
            ));
        let out = build(&st, "cluster.local");
        let names: Vec<&str> = out
            .model
            .workloads
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(names, ["app"], "{names:?}");
    }

    #[test]
    fn l7_output_is_deterministic() {
        let mut a = state();
        a.http_routes = vec![
            obj("metadata: {name: b, namespace: shop}\nspec: {parentRefs: [{kind: Service, group: '', name: web}]}"),
            obj("metadata: {name: a, namespace: shop}\nspec: {parentRefs: [{kind: Service, group: '', name: web}]}"),
        ];
        let mut b = a.clone();
        b.http_routes.reverse();
        b.gateways.reverse();
        b.services.reverse();
        assert_eq!(build(&a, "td"), build(&b, "td"));
        let built = build(&a, "td");
        let names: Vec<&str> = built
            .model
            .http_routes
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        assert_eq!(names, ["a", "b"]);
    }
}
