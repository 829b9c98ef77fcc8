use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

/// A model with these HTTPRoutes and GRPCRoutes (YAML list items).
fn table(http_routes: &str, grpc_routes: &str) -> RouteTable {
    let doc = format!("http_routes:\n{http_routes}\ngrpc_routes:\n{grpc_routes}\n");
    let model = MeshModel::from_yaml(&doc).unwrap();
    RouteTable::build(&model)
}

fn http(routes: &str) -> RouteTable {
    table(routes, "  []")
}

fn req(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).unwrap().into_parts().0
}

fn get(uri: &str) -> Parts {
    req("GET", uri, &[])
}

/// The rule that forwards `r` to service shop/web:80.
fn rule_of(t: &RouteTable, r: &Parts) -> String {
    match t.route("shop", "web", 80, "shop", r) {
        RouteDecision::Forward(f) => f.rule.to_owned(),
        other => format!("{:?}", other.status()),
    }
}

fn forward<'a>(d: RouteDecision<'a>) -> Forward<'a> {
    match d {
        RouteDecision::Forward(f) => f,
        other => panic!("not forwarded: {other:?}"),
    }
}

/// One route on shop/web with one rule per `(match, backend)`.
fn rules(route: &str, created: &str, matches: &[&str]) -> String {
    let mut s = format!(
        "  - name: {route}\n    namespace: shop\n    created: '{created}'\n    parents: [{{ name: web }}]\n    rules:\n"
    );
    for (i, m) in matches.iter().enumerate() {
        s += &format!(
            "      - {{ matches: [{m}], backends: [{{ name: {route}-{i}, port: 80 }}] }}\n"
        );
    }
    s
}

#[test]
fn without_routes_the_service_itself_is_the_backend() {
    let t = http("  []");
    let f = forward(t.route("shop", "web", 8080, "shop", &get("/x")));
    assert_eq!(f.rule, DEFAULT_RULE);
    assert_eq!(
        *f.backend,
        BackendRef {
            name: "web".into(),
            namespace: "shop".into(),
            port: 8080
        }
    );
    assert!(f.rewrite.is_none() && f.mirrors().next().is_none());
    assert!(t.problems.is_empty());
}

#[test]
fn routes_attach_to_a_service_port_and_unmatched_requests_get_404() {
    let t = http(
        "  - { name: r, namespace: shop, parents: [{ name: web, port: 80 }], rules: [{ matches: [{ path: { type: Exact, value: /a } }], backends: [{ name: a, port: 80 }] }] }",
    );
    assert_eq!(rule_of(&t, &get("/a")), "shop/r#0");
    assert_eq!(
        t.route("shop", "web", 80, "shop", &get("/b")).status(),
        Some(StatusCode::NOT_FOUND)
    );
    // Another port, another namespace: nothing attached, default route.
    assert_eq!(
        forward(t.route("shop", "web", 81, "shop", &get("/b"))).rule,
        DEFAULT_RULE
    );
    assert_eq!(
        forward(t.route("other", "web", 80, "shop", &get("/b"))).rule,
        DEFAULT_RULE
    );
}

#[test]
fn exact_beats_longest_prefix_beats_regex() {
    let t = http(&rules(
        "r",
        "",
        &[
            "{ path: { type: RegularExpression, value: '/api/.*' } }",
            "{ path: { type: PathPrefix, value: /api } }",
            "{ path: { type: PathPrefix, value: /api/v1 } }",
            "{ path: { type: Exact, value: /api/v1/items } }",
        ],
    ));
    assert_eq!(rule_of(&t, &get("/api/v1/items")), "shop/r#3");
    assert_eq!(rule_of(&t, &get("/api/v1/items/7")), "shop/r#2");
    assert_eq!(rule_of(&t, &get("/api/v2")), "shop/r#1");
    assert_eq!(rule_of(&t, &get("/api")), "shop/r#1");
    // Regex is a full match and comes last.
    assert_eq!(rule_of(&t, &get("/apiary")), "Some(404)");
    let t = http(&rules(
        "r",
        "",
        &["{ path: { type: RegularExpression, value: '/api.*' } }"],
    ));
    assert_eq!(rule_of(&t, &get("/apiary")), "shop/r#0");
    assert_eq!(rule_of(&t, &get("/x/apiary")), "Some(404)");
}

#[test]
fn prefixes_match_whole_segments() {
    let t = http(&rules(
        "r",
        "",
        &[
            "{ path: { type: PathPrefix, value: /foo } }",
            "{ path: { type: PathPrefix, value: /bar/ } }",
        ],
    ));
    assert_eq!(rule_of(&t, &get("/foo")), "shop/r#0");
    assert_eq!(rule_of(&t, &get("/foo/")), "shop/r#0");
    assert_eq!(rule_of(&t, &get("/foo/bar?x=1")), "shop/r#0");
    assert_eq!(rule_of(&t, &get("/foobar")), "Some(404)");
    // A trailing slash in the prefix is ignored.
    assert_eq!(rule_of(&t, &get("/bar")), "shop/r#1");
    assert_eq!(rule_of(&t, &get("/bar/baz")), "shop/r#1");
    assert_eq!(rule_of(&t, &get("/barn")), "Some(404)");
}

#[test]
fn method_headers_and_query_params_match_and_rank() {
    let t = http(&rules(
        "r",
        "",
        &[
            "{ path: { type: PathPrefix, value: / } }",
            "{ path: { type: PathPrefix, value: / }, headers: [{ name: X-Env, value: canary }] }",
            "{ path: { type: PathPrefix, value: / }, headers: [{ name: x-env, value: canary }, { type: RegularExpression, name: x-user, value: 'a.*' }] }",
            "{ path: { type: PathPrefix, value: / }, method: POST }",
            "{ path: { type: PathPrefix, value: / }, query_params: [{ name: v, value: '2 x' }] }",
        ],
    ));
    assert_eq!(rule_of(&t, &get("/")), "shop/r#0");
    assert_eq!(
        rule_of(&t, &req("GET", "/", &[("x-env", "canary")])),
        "shop/r#1"
    );
    assert_eq!(
        rule_of(
            &t,
            &req("GET", "/", &[("x-env", "canary"), ("x-user", "alice")])
        ),
        "shop/r#2"
    );
    // Regex header values match whole values only.
    assert_eq!(
        rule_of(
            &t,
            &req("GET", "/", &[("x-env", "canary"), ("x-user", "bob-a")])
        ),
        "shop/r#1"
    );
    // A method match outranks header matches.
    assert_eq!(
        rule_of(
            &t,
            &req("POST", "/", &[("x-env", "canary"), ("x-user", "alice")])
        ),
        "shop/r#3"
    );
    assert_eq!(rule_of(&t, &get("/?a=1&v=2%20x")), "shop/r#4");
    assert_eq!(rule_of(&t, &get("/?v=2")), "shop/r#0");
    // Headers outrank query params.
    assert_eq!(
        rule_of(&t, &req("GET", "/?v=2%20x", &[("x-env", "canary")])),
        "shop/r#1"
    );
}

#[test]
fn ties_go_to_the_oldest_route_then_by_name_then_rule_order() {
    let m = "{ path: { type: PathPrefix, value: /a } }";
    let t = http(
        &(rules("young", "2024-06-01T00:00:00Z", &[m])
            + &rules("old", "2024-01-01T00:00:00Z", &[m])),
    );
    assert_eq!(rule_of(&t, &get("/a")), "shop/old#0");

    let t = http(
        &(rules("b", "2024-01-01T00:00:00Z", &[m]) + &rules("a", "2024-01-01T00:00:00Z", &[m])),
    );
    assert_eq!(rule_of(&t, &get("/a")), "shop/a#0");

    // Within a route, the first rule; and a named rule is named so.
    let t = http(&rules("r", "", &[m, m]));
    assert_eq!(rule_of(&t, &get("/a")), "shop/r#0");
    let t = http(
        "  - { name: r, namespace: shop, parents: [{ name: web }], rules: [{ name: first, backends: [{ name: a, port: 80 }] }] }",
    );
    assert_eq!(rule_of(&t, &get("/anything")), "shop/r#first");
}

#[test]
fn hostnames_filter_routes_and_the_most_specific_wins() {
    let t = http(
        "  - { name: any, namespace: shop, parents: [{ name: web }], rules: [{ backends: [{ name: a, port: 80 }] }] }
  - { name: wild, namespace: shop, parents: [{ name: web }], hostnames: ['*.example.com'], rules: [{ backends: [{ name: a, port: 80 }] }] }
  - { name: exact, namespace: shop, parents: [{ name: web }], hostnames: [api.example.com], rules: [{ backends: [{ name: a, port: 80 }] }] }",
    );
    let host = |h: &str| rule_of(&t, &req("GET", "/", &[("host", h)]));
    assert_eq!(host("api.example.com"), "shop/exact#0");
    assert_eq!(host("API.example.com:8080"), "shop/exact#0");
    assert_eq!(host("www.example.com"), "shop/wild#0");
    assert_eq!(host("a.b.example.com"), "shop/wild#0");
    assert_eq!(host("example.com"), "shop/any#0");
    assert_eq!(host("web.shop.svc"), "shop/any#0");
    // The authority of an absolute URI (HTTP/2) counts as the host.
    assert_eq!(
        rule_of(&t, &get("http://api.example.com/x")),
        "shop/exact#0"
    );
    // A host-less request matches only routes without hostnames.
    assert_eq!(rule_of(&t, &get("/")), "shop/any#0");
    // A more specific hostname wins even over a more specific path.
    let t = http(
        "  - { name: path, namespace: shop, parents: [{ name: web }], rules: [{ matches: [{ path: { type: Exact, value: /x } }], backends: [{ name: a, port: 80 }] }] }
  - { name: host, namespace: shop, parents: [{ name: web }], hostnames: [api.example.com], rules: [{ backends: [{ name: a, port: 80 }] }] }",
    );
    assert_eq!(
        rule_of(&t, &req("GET", "/x", &[("host", "api.example.com")])),
        "shop/host#0"
    );
    assert_eq!(
        rule_of(&t, &req("GET", "/x", &[("host", "other")])),
        "shop/path#0"
    );
}

#[test]
fn weights_split_traffic_and_zero_weight_gets_none() {
    let t = http(
        "  - { name: r, namespace: shop, parents: [{ name: web }], rules: [{ backends: [{ name: v1, port: 80, weight: 90 }, { name: v2, port: 80, weight: 10 }, { name: v3, port: 80, weight: 0 }] }] }",
    );
    let mut rng = StdRng::seed_from_u64(7);
    let r = get("/");
    let mut counts = HashMap::<String, u32>::new();
    for _ in 0..10_000 {
        let f = forward(t.route_with_rng("shop", "web", 80, "shop", &r, &mut rng));
        *counts.entry(f.backend.name.clone()).or_default() += 1;
    }
    let v1 = counts.get("v1").copied().unwrap_or(0);
    let v2 = counts.get("v2").copied().unwrap_or(0);
    assert!((8_800..=9_200).contains(&v1), "{counts:?}");
    assert!((800..=1_200).contains(&v2), "{counts:?}");
    assert!(!counts.contains_key("v3"), "{counts:?}");
}

#[test]
fn rules_without_a_usable_backend_answer_500() {
    let t = http(
        "  - { name: none, namespace: shop, parents: [{ name: web }], rules: [{ matches: [{ path: { type: Exact, value: /none } }] }] }
  - { name: zero, namespace: shop, parents: [{ name: web }], rules: [{ matches: [{ path: { type: Exact, value: /zero } }], backends: [{ name: a, port: 80, weight: 0 }] }] }
  - { name: bad, namespace: shop, parents: [{ name: web }], rules: [{ matches: [{ path: { type: Exact, value: /bad } }], backends: [{ name: '', port: 80 }] }] }",
    );
    for path in ["/none", "/zero", "/bad"] {
        let d = t.route("shop", "web", 80, "shop", &get(path));
        assert_eq!(
            d.status(),
            Some(StatusCode::INTERNAL_SERVER_ERROR),
            "{path}"
        );
        assert!(matches!(d, RouteDecision::NoBackend { .. }), "{path}");
    }
    assert_eq!(t.problems.len(), 1, "{:?}", t.problems);
}

#[test]
fn invalid_regexes_never_match_and_are_reported() {
    let t = http(&rules(
        "r",
        "",
        &[
            "{ path: { type: RegularExpression, value: '/(' } }",
            "{ headers: [{ type: RegularExpression, name: x, value: '[' }] }",
        ],
    ));
    assert_eq!(t.problems.len(), 2, "{:?}", t.problems);
    assert!(t.problems[0].contains("shop/r#0"), "{:?}", t.problems);
    assert_eq!(rule_of(&t, &get("/(")), "Some(404)");
    assert_eq!(rule_of(&t, &req("GET", "/", &[("x", "[")])), "Some(404)");
}

#[test]
fn forward_carries_filters_rewrite_mirrors_timeouts_and_retry() {
    let t = http(
        "  - name: r
    namespace: shop
    parents: [{ name: web }]
    rules:
      - matches: [{ path: { type: PathPrefix, value: /api/ } }]
        filters:
          - !RequestHeaderModifier { set: [[x-route, r]], add: [[x-hop, '1']], remove: [x-drop] }
          - !ResponseHeaderModifier { add: [[x-served-by, r]] }
          - !UrlRewrite { hostname: api.internal, path: { type: ReplacePrefixMatch, value: /v2 } }
          - !RequestMirror { backend: { name: shadow, port: 80 }, percent: 5 }
        backends:
          - name: api
            namespace: backend
            port: 8080
            filters: [!RequestHeaderModifier { set: [[x-route, backend]] }]
        timeouts: { request_ms: 1000, backend_request_ms: 300 }
        retry: { attempts: 2, codes: [503] }",
    );
    let f = forward(t.route("shop", "web", 80, "shop", &get("/api/items?page=2")));
    assert_eq!(f.backend.namespace, "backend");
    assert_eq!(f.backend.port, 8080);
    assert_eq!(
        f.rewrite,
        Some(Rewrite {
            authority: Some("api.internal".into()),
            path_and_query: Some("/v2/items?page=2".into()),
        })
    );
    let mirrors: Vec<&Mirror> = f.mirrors().collect();
    assert_eq!(
        mirrors,
        vec![&Mirror {
            backend: BackendRef {
                name: "shadow".into(),
                namespace: "shop".into(),
                port: 80
            },
            percent: 5
        }]
    );
    assert_eq!(f.timeouts.and_then(|t| t.backend_request_ms), Some(300));
    assert_eq!(f.retry.map(|r| r.attempts), Some(2));

    let mut h = HeaderMap::new();
    h.insert("x-drop", "1".parse().unwrap());
    h.insert("x-hop", "0".parse().unwrap());
    f.apply_request_headers(&mut h);
    // The backend's filter runs after the rule's.
    assert_eq!(h["x-route"], "backend");
    assert_eq!(h.get_all("x-hop").iter().count(), 2);
    assert!(!h.contains_key("x-drop"));
    let mut h = HeaderMap::new();
    f.apply_response_headers(&mut h);
    assert_eq!(h["x-served-by"], "r");
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn header_modifier_sets_adds_and_removes() {
    let m = HeaderModifier {
        set: vec![("X-A".into(), "new".into())],
        add: vec![("x-b".into(), "2".into())],
        remove: vec!["X-C".into()],
    };
    let mut h = HeaderMap::new();
    h.append("x-a", "old1".parse().unwrap());
    h.append("x-a", "old2".parse().unwrap());
    h.insert("x-b", "1".parse().unwrap());
    h.insert("x-c", "gone".parse().unwrap());
    apply_header_modifier(&m, &mut h);
    let all = |n: &str| {
        h.get_all(n)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(all("x-a"), ["new"]);
    assert_eq!(all("x-b"), ["1", "2"]);
    assert!(all("x-c").is_empty());

    let mut problems = Vec::new();
    let bad = HeaderModifier {
        set: vec![("bad name".into(), "v".into())],
        ..Default::default()
    };
    HeaderEdits::compile(&bad, &mut problems);
    assert_eq!(problems.len(), 1);
}

#[test]
fn replace_prefix_match_follows_the_spec_table() {
    // (request path, prefix match, replacement, result) from HTTPPathModifier.
    let cases = [
        ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
        ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
        ("/foo", "/foo", "/xyz", "/xyz"),
        ("/foo/", "/foo", "/xyz", "/xyz/"),
        ("/foo/bar", "/foo", "", "/bar"),
        ("/foo/", "/foo", "", "/"),
        ("/foo", "/foo", "", "/"),
        ("/foo/", "/foo", "/", "/"),
        ("/foo", "/foo", "/", "/"),
        ("/foo/bar", "/", "/xyz", "/xyz/foo/bar"),
    ];
    for (path, prefix, replacement, want) in cases {
        assert_eq!(
            replace_prefix_match(path, prefix, replacement),
            want,
            "{path} {prefix} {replacement}"
        );
    }
}

#[test]
fn redirects_compose_location_per_spec() {
    let redirect = |filter: &str, uri: &str, host: &str| -> (StatusCode, String) {
        let t = http(&format!(
            "  - {{ name: r, namespace: shop, parents: [{{ name: web }}], rules: [{{ matches: [{{ path: {{ type: PathPrefix, value: /old }} }}], filters: [!RequestRedirect {filter}] }}] }}"
        ));
        match t.route(
            "shop",
            "web",
            8080,
            "shop",
            &req("GET", uri, &[("host", host)]),
        ) {
            RouteDecision::Redirect { rule, response } => {
                assert_eq!(rule, "shop/r#0");
                let loc = response.headers()[http::header::LOCATION]
                    .to_str()
                    .unwrap()
                    .to_owned();
                (response.status(), loc)
            }
            other => panic!("{other:?}"),
        }
    };
    // Nothing set: same scheme/host/path, the listener port, 302.
    assert_eq!(
        redirect("{}", "/old/a?q=1", "web.shop"),
        (StatusCode::FOUND, "http://web.shop:8080/old/a?q=1".into())
    );
    // A scheme brings its well-known port, left out of Location.
    assert_eq!(
        redirect(
            "{ scheme: https, status_code: 301 }",
            "/old",
            "web.shop:8080"
        )
        .1,
        "https://web.shop/old"
    );
    assert_eq!(
        redirect("{ scheme: https, status_code: 301 }", "/old", "web").0,
        StatusCode::MOVED_PERMANENTLY
    );
    assert_eq!(
        redirect("{ scheme: http, hostname: example.com }", "/old", "web").1,
        "http://example.com/old"
    );
    assert_eq!(
        redirect("{ hostname: example.com, port: 9090 }", "/old", "web").1,
        "http://example.com:9090/old"
    );
    assert_eq!(
        redirect(
            "{ port: 80, path: { type: ReplaceFullPath, value: /new } }",
            "/old/x",
            "web"
        )
        .1,
        "http://web/new"
    );
    assert_eq!(
        redirect(
            "{ port: 80, path: { type: ReplacePrefixMatch, value: /new } }",
            "/old/x?y",
            "web"
        )
        .1,
        "http://web/new/x?y"
    );
}

const GRPC: &str = "application/grpc";

fn grpc_req(path: &str) -> Parts {
    req("POST", path, &[("content-type", GRPC)])
}

#[test]
fn grpc_methods_match_with_grpcroute_precedence() {
    let t = table(
        "  []",
        "  - name: g
    namespace: shop
    parents: [{ name: web }]
    rules:
      - { matches: [{ method: { method: Get } }], backends: [{ name: method-only, port: 80 }] }
      - { matches: [{ method: { service: shop.Cart } }], backends: [{ name: service-only, port: 80 }] }
      - { matches: [{ method: { service: shop.Cart, method: Get } }], backends: [{ name: both, port: 80 }] }
      - { matches: [{ method: { type: RegularExpression, service: 'shop\\..*', method: 'List.*' } }], backends: [{ name: regex, port: 80 }] }
      - { matches: [{ method: { service: shop.Cart, method: Get }, headers: [{ name: x-canary, value: 'yes' }] }], backends: [{ name: canary, port: 80 }] }",
    );
    let backend = |r: &Parts| match t.route("shop", "web", 80, "shop", r) {
        RouteDecision::Forward(f) => f.backend.name.clone(),
        other => format!("{:?}", other.status()),
    };
    assert_eq!(backend(&grpc_req("/shop.Cart/Get")), "both");
    assert_eq!(
        backend(&req(
            "POST",
            "/shop.Cart/Get",
            &[
                ("content-type", "application/grpc+proto"),
                ("x-canary", "yes")
            ]
        )),
        "canary"
    );
    assert_eq!(backend(&grpc_req("/shop.Cart/Put")), "service-only");
    assert_eq!(backend(&grpc_req("/shop.Orders/Get")), "method-only");
    assert_eq!(backend(&grpc_req("/shop.Orders/ListAll")), "regex");
    assert_eq!(backend(&grpc_req("/other.Orders/ListAll")), "Some(404)");
    // Not gRPC: GRPCRoutes do not apply, and they are all there is.
    assert_eq!(backend(&get("/shop.Cart/Get")), "Some(404)");
}

#[test]
fn grpc_requests_try_grpcroutes_before_httproutes() {
    let t = table(
        "  - { name: h, namespace: shop, parents: [{ name: web }], rules: [{ backends: [{ name: http, port: 80 }] }] }",
        "  - { name: g, namespace: shop, parents: [{ name: web }], rules: [{ matches: [{ method: { service: shop.Cart } }], backends: [{ name: grpc, port: 80 }] }] }",
    );
    let backend = |r: &Parts| {
        forward(t.route("shop", "web", 80, "shop", r))
            .backend
            .name
            .clone()
    };
    assert_eq!(backend(&grpc_req("/shop.Cart/Get")), "grpc");
    assert_eq!(backend(&grpc_req("/shop.Orders/Get")), "http");
    assert_eq!(backend(&get("/shop.Cart/Get")), "http");
}

#[test]
fn consumer_routes_apply_only_to_their_namespace_and_replace_the_producer_routes() {
    let t = http(
        "  - { name: producer, namespace: shop, parents: [{ name: web }], rules: [{ backends: [{ name: web, port: 80 }] }] }
  - { name: mine, namespace: front, parents: [{ name: web, namespace: shop, port: 80 }], rules: [{ filters: [!ResponseHeaderModifier { set: [[x-consumer, front]] }], backends: [{ name: web, namespace: shop, port: 80 }] }] }",
    );
    let from = |ns: &str, port| match t.route("shop", "web", port, ns, &get("/")) {
        RouteDecision::Forward(f) => (f.rule.to_owned(), f.backend.namespace.clone()),
        other => panic!("{other:?}"),
    };
    assert_eq!(from("front", 80), ("front/mine#0".into(), "shop".into()));
    assert_eq!(from("shop", 80), ("shop/producer#0".into(), "shop".into()));
    assert_eq!(
        from("elsewhere", 80),
        ("shop/producer#0".into(), "shop".into())
    );
    // The consumer route names port 80 only: on 8080 the producer's apply.
    assert_eq!(
        from("front", 8080),
        ("shop/producer#0".into(), "shop".into())
    );
    let f = forward(t.route("shop", "web", 80, "front", &get("/")));
    let mut h = HeaderMap::new();
    f.apply_response_headers(&mut h);
    assert_eq!(h["x-consumer"], "front");
}

#[test]
fn a_waypoint_gateway_parent_routes_every_service_using_that_waypoint() {
    let doc = "services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80 }], waypoint: wp }
  - { name: api, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80 }], waypoint: wp }
  - { name: direct, namespace: shop, vips: [10.96.0.3], ports: [{ port: 80 }] }
http_routes:
  - { name: all, namespace: shop, parents: [{ kind: Gateway, name: wp, port: 15008 }], rules: [{ matches: [{ path: { type: PathPrefix, value: /v2 } }], backends: [{ name: v2, port: 80 }] }] }
";
    let t = RouteTable::build(&MeshModel::from_yaml(doc).unwrap());
    for svc in ["web", "api"] {
        let f = forward(t.route("shop", svc, 80, "shop", &get("/v2/x")));
        assert_eq!((f.rule, f.backend.name.as_str()), ("shop/all#0", "v2"));
        assert_eq!(
            t.route("shop", svc, 80, "shop", &get("/v1")).status(),
            Some(StatusCode::NOT_FOUND)
        );
    }
    // A Service not using the waypoint is not attached.
    assert_eq!(
        forward(t.route("shop", "direct", 80, "shop", &get("/v2"))).rule,
        DEFAULT_RULE
    );
}
