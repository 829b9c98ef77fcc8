//! The upstream Gateway API mesh conformance cases as data: for each case
//! file in `tests/conformance/tests/`, the upstream test's short name,
//! features and every request it makes with what it expects, ported from
//! the Go file of the same name (`conformance/tests/mesh/<case>.go` of
//! kubernetes-sigs/gateway-api, at the commit `tests/conformance/README.md`
//! names). Only the expectations are ported; `super` runs them.

/// The namespace of the echo backends (upstream `suite.MeshNamespace`).
pub const MESH_NS: &str = "gateway-conformance-mesh";
/// The namespace of the consumer-route client.
pub const CONSUMER_NS: &str = "gateway-conformance-mesh-consumer";
/// Upstream `echo.MeshAppEchoV1` / `MeshAppEchoV2`.
pub const ECHO_V1: &str = "app=echo,version=v1";
pub const ECHO_V2: &str = "app=echo,version=v2";

/// One upstream conformance test.
#[derive(Clone, Debug)]
pub struct Case {
    /// Upstream `ShortName`; also the name of its test function.
    pub name: &'static str,
    /// The case file under `tests/conformance/tests/`.
    pub file: &'static str,
    pub description: &'static str,
    /// Upstream `Features` (feature names as the report spells them).
    pub features: &'static [&'static str],
    /// Upstream `Provisional`.
    pub provisional: bool,
    pub check: Check,
}

#[derive(Clone, Debug)]
pub enum Check {
    /// Each request must, eventually and then consistently, get what it
    /// expects (upstream `MakeRequestAndExpectEventuallyConsistentResponse`).
    Requests(Vec<Expect>),
    /// The request first succeeds as `Requests` would, then 500 of them
    /// (upstream `weight.TestWeightedDistribution*`) land on each backend
    /// within 5 points of its share; up to 10 tries, as upstream.
    Weights {
        request: Box<Expect>,
        weights: &'static [(&'static str, f64)],
        /// gRPC batches name the backend by the pod name less its two
        /// hash parts (upstream `extractBackendName`); HTTP by prefix.
        batch: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Grpc,
}

/// Where a request is addressed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A DNS name as the client writes it (`echo`, `echo-v1.<ns>`,
    /// optionally `:port`).
    Name(String),
    /// The address of the first pod matching `selector` in the mesh
    /// namespace, and a port (upstream `http.Ipv6SafeHost(pod.Address)`).
    PodIp { selector: &'static str, port: u16 },
}

/// A redirect's `Location`, each part defaulting to the request's own (as
/// the upstream Gateway runner compares `RedirectRequest`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<&'static str>,
    pub host: Option<&'static str>,
    pub port: Option<&'static str>,
    pub path: Option<&'static str>,
}

/// One request and what its answer must show (upstream
/// `http.ExpectedResponse` as the mesh runner reads it).
#[derive(Clone, Debug)]
pub struct Expect {
    /// Upstream `TestCaseName`, or one made the way `GetTestCaseName` does.
    pub name: String,
    /// The client pod: namespace and label selector.
    pub client: (&'static str, &'static str),
    pub protocol: Protocol,
    pub host: Host,
    pub path: String,
    pub method: &'static str,
    pub headers: Vec<(String, String)>,
    /// Statuses accepted (upstream `StatusCodes`, default 200).
    pub status: Vec<u16>,
    /// Prefix of the answering pod's name ("" for any).
    pub backend: &'static str,
    /// Headers the backend must have received (values joined by `,`).
    pub request_headers: Vec<(String, String)>,
    /// Headers the backend must not have received.
    pub request_absent: Vec<String>,
    /// The path (and query) the backend must have received.
    pub request_path: Option<&'static str>,
    pub response_headers: Vec<(String, String)>,
    pub response_absent: Vec<String>,
    pub redirect: Option<Redirect>,
}

fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

impl Expect {
    /// A GET of `path` to `echo` from echo-v1 of the mesh namespace,
    /// expecting 200 (upstream's defaults).
    fn get(path: &str) -> Self {
        Expect {
            name: String::new(),
            client: (MESH_NS, ECHO_V1),
            protocol: Protocol::Http,
            host: Host::Name("echo".to_owned()),
            path: path.to_owned(),
            method: "GET",
            headers: Vec::new(),
            status: vec![200],
            backend: "",
            request_headers: Vec::new(),
            request_absent: Vec::new(),
            request_path: None,
            response_headers: Vec::new(),
            response_absent: Vec::new(),
            redirect: None,
        }
    }

    fn grpc() -> Self {
        Expect {
            protocol: Protocol::Grpc,
            host: Host::Name("echo:7070".to_owned()),
            path: String::new(),
            ..Expect::get("")
        }
    }

    fn named(mut self, n: &str) -> Self {
        self.name = n.to_owned();
        self
    }
    fn host(mut self, h: &str) -> Self {
        self.host = Host::Name(h.to_owned());
        self
    }
    fn from(mut self, ns: &'static str, selector: &'static str) -> Self {
        self.client = (ns, selector);
        self
    }
    fn headers(mut self, h: &[(&str, &str)]) -> Self {
        self.headers = kv(h);
        self
    }
    fn status(mut self, s: u16) -> Self {
        self.status = vec![s];
        self
    }
    fn backend(mut self, b: &'static str) -> Self {
        self.backend = b;
        self
    }
    fn got_headers(mut self, h: &[(&str, &str)]) -> Self {
        self.request_headers = kv(h);
        self
    }
    fn got_absent(mut self, h: &[&str]) -> Self {
        self.request_absent = strings(h);
        self
    }
    fn got_path(mut self, p: &'static str) -> Self {
        self.request_path = Some(p);
        self
    }
    fn answer_headers(mut self, h: &[(&str, &str)]) -> Self {
        self.response_headers = kv(h);
        self
    }
    fn answer_absent(mut self, h: &[&str]) -> Self {
        self.response_absent = strings(h);
        self
    }
    fn redirect(mut self, r: Redirect) -> Self {
        self.redirect = Some(r);
        self
    }
}

/// Names unnamed expectations the way upstream `GetTestCaseName` does.
fn numbered(mut v: Vec<Expect>) -> Vec<Expect> {
    for (i, e) in v.iter_mut().enumerate() {
        if e.name.is_empty() {
            let host = match &e.host {
                Host::Name(h) => h.clone(),
                Host::PodIp { selector, port } => format!("<{selector} pod>:{port}"),
            };
            e.name = if e.headers.is_empty() {
                format!("{i} request to '{host}{}'", e.path)
            } else {
                format!("{i} request to '{host}{}' with headers", e.path)
            };
        }
    }
    v
}

const MESH: &str = "Mesh";
const HTTP_ROUTE: &str = "HTTPRoute";
const GRPC_ROUTE: &str = "GRPCRoute";

/// Every ported case, in the order of their files.
pub fn all() -> Vec<Case> {
    vec![
        grpc_request_header_modifier(),
        Case {
            name: "MeshGRPCRouteWeight",
            file: "grpcroute-weight.yaml",
            description: "A GRPCRoute with weighted backends in mesh mode",
            features: &[MESH, GRPC_ROUTE],
            provisional: false,
            check: Check::Weights {
                request: Box::new(Expect::grpc()),
                weights: &[("echo-v1", 0.7), ("echo-v2", 0.3)],
                batch: true,
            },
        },
        redirect_status("MeshHTTPRoute303Redirect", "httproute-303-redirect.yaml", 303, "/redirect"),
        redirect_status("MeshHTTPRoute307Redirect", "httproute-307-redirect.yaml", 307, "/temporary"),
        redirect_status("MeshHTTPRoute308Redirect", "httproute-308-redirect.yaml", 308, "/permanent"),
        Case {
            name: "MeshHTTPRouteMatching",
            file: "httproute-matching.yaml",
            description: "A single HTTPRoute with path and header matching for different backends",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Requests(numbered(vec![
                Expect::get("/").backend("echo-v1"),
                Expect::get("/example").backend("echo-v1"),
                Expect::get("/").headers(&[("Version", "one")]).backend("echo-v1"),
                Expect::get("/v2").backend("echo-v2"),
                Expect::get("/v2/example").backend("echo-v2"),
                Expect::get("/").headers(&[("Version", "two")]).backend("echo-v2"),
                Expect::get("/v2/").backend("echo-v2"),
                // Not a path segment prefix, so it does not match /v2.
                Expect::get("/v2example").backend("echo-v1"),
                Expect::get("/foo/v2/example").backend("echo-v1"),
            ])),
        },
        Case {
            name: "MeshHTTPRouteNamedRule",
            file: "httproute-named-rule.yaml",
            description: "An HTTPRoute with a named HTTPRouteRule",
            features: &[MESH, HTTP_ROUTE, "MeshHTTPRouteNamedRouteRule"],
            provisional: true,
            check: Check::Requests(numbered(vec![
                Expect::get("/named").got_path("/named").backend("echo-v1"),
                // Upstream writes ExpectedRequest path "/named" here too, for
                // a rule with no rewrite (its mesh runner never compares
                // paths); the path this route can deliver is the request's.
                Expect::get("/unnamed").got_path("/unnamed").backend("echo-v2"),
            ])),
        },
        query_param_matching(),
        Case {
            name: "MeshHTTPRouteRedirectHostAndStatus",
            file: "httproute-redirect-host-and-status.yaml",
            description: "An HTTPRoute with hostname and statusCode redirect filters",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Requests(numbered(vec![
                Expect::get("/hostname-redirect").status(302).redirect(Redirect {
                    host: Some("example.org"),
                    ..Default::default()
                }),
                Expect::get("/host-and-status").status(301).redirect(Redirect {
                    host: Some("example.org"),
                    ..Default::default()
                }),
            ])),
        },
        redirect_path(),
        redirect_port(),
        redirect_scheme(),
        Case {
            name: "MeshHTTPRouteBackendRequestHeaderModifier",
            file: "httproute-request-header-modifier-backend.yaml",
            description: "An HTTPRoute backend has request header modifier filters applied correctly",
            features: &[MESH, HTTP_ROUTE, "MeshHTTPRouteBackendRequestHeaderModification"],
            provisional: false,
            check: Check::Requests(request_header_modifier_expectations()),
        },
        Case {
            name: "MeshHTTPRouteRequestHeaderModifier",
            file: "httproute-request-header-modifier.yaml",
            description: "An HTTPRoute has request header modifier filters applied correctly",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Requests(request_header_modifier_expectations()),
        },
        rewrite_path(),
        Case {
            name: "MeshHTTPRouteSimpleSameNamespace",
            file: "httproute-simple-same-namespace.yaml",
            description: "A single HTTPRoute in the gateway-conformance-mesh namespace attaches to a Service in the same namespace",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Requests(numbered(vec![Expect::get("/")
                .named("Simple HTTP request should reach infra-backend")
                .backend("echo-v1")])),
        },
        Case {
            name: "MeshHTTPRouteWeight",
            file: "httproute-weight.yaml",
            description: "An HTTPRoute with weighted backends",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Weights {
                request: Box::new(Expect::get("/")),
                weights: &[("echo-v1", 0.7), ("echo-v2", 0.3)],
                batch: false,
            },
        },
        Case {
            name: "MeshConsumerRoute",
            file: "mesh-consumer-route.yaml",
            description: "An HTTPRoute in a namespace other than its parentRef's namespace only affects requests from the route's namespace",
            features: &[MESH, "MeshConsumerRoute", HTTP_ROUTE, "HTTPRouteResponseHeaderModification"],
            provisional: false,
            check: Check::Requests(vec![
                Expect::get("/")
                    .named("request from consumer route's namespace modified by HTTPRoute")
                    .from(CONSUMER_NS, ECHO_V1)
                    .host("echo-v1.gateway-conformance-mesh")
                    .answer_headers(&[("X-Header-Set", "set")])
                    .backend("echo-v1"),
                Expect::get("/")
                    .named("request not from consumer route's namespace not modified by HTTPRoute")
                    .host("echo-v1.gateway-conformance-mesh")
                    .answer_absent(&["X-Header-Set"])
                    .backend("echo-v1"),
            ]),
        },
        Case {
            name: "MeshFrontend",
            file: "mesh-frontend.yaml",
            description: "Mesh rules should only apply to the associated frontend",
            features: &[MESH, HTTP_ROUTE, "HTTPRouteResponseHeaderModification"],
            provisional: false,
            check: Check::Requests(vec![
                Expect::get("")
                    .named("Send to service")
                    .host("echo-v2")
                    .answer_headers(&[("X-Header-Set", "set")])
                    .backend("echo-v2"),
                Expect {
                    host: Host::PodIp {
                        selector: ECHO_V2,
                        port: 8080,
                    },
                    ..Expect::get("")
                        .named("Send to pod IP")
                        .answer_absent(&["X-Header-Set"])
                        .backend("echo-v2")
                },
            ]),
        },
        Case {
            name: "MeshPorts",
            file: "mesh-ports.yaml",
            description: "A mesh route can optionally configure 'port' in parentRef",
            features: &[MESH, HTTP_ROUTE, "HTTPRouteParentRefPort", "HTTPRouteResponseHeaderModification"],
            provisional: false,
            check: Check::Requests(vec![
                Expect::get("")
                    .named("Explicit port set, send to that port")
                    .host("echo-v1")
                    .answer_headers(&[("X-Header-Set", "v1")])
                    .backend("echo-v1"),
                Expect::get("")
                    .named("Explicit port, send to an excluded port")
                    .host("echo-v1:8080")
                    .answer_absent(&["X-Header-Set"])
                    .backend("echo-v1"),
                Expect::get("")
                    .named("No port set")
                    .host("echo-v2")
                    .answer_headers(&[("X-Header-Set", "v2")])
                    .backend("echo-v2"),
                Expect::get("")
                    .named("No port set (8080)")
                    .host("echo-v2:8080")
                    .answer_headers(&[("X-Header-Set", "v2")])
                    .backend("echo-v2"),
            ]),
        },
        Case {
            name: "MeshTrafficSplit",
            file: "mesh-split.yaml",
            description: "A mesh client can send traffic to a Service which is split between two versions",
            features: &[MESH, HTTP_ROUTE],
            provisional: false,
            check: Check::Requests(numbered(vec![
                Expect::get("/v1").backend("echo-v1"),
                Expect::get("/v2").backend("echo-v2"),
            ])),
        },
    ]
}

fn grpc_request_header_modifier() -> Case {
    let call = |name: &str, client, backend, case: &str| {
        Expect::grpc()
            .named(name)
            .from(MESH_NS, client)
            .backend(backend)
            .headers(&[("x-test-case", case)])
    };
    let with = |mut e: Expect, extra: &[(&str, &str)]| {
        e.headers.extend(kv(extra));
        e
    };
    Case {
        name: "MeshGRPCRouteRequestHeaderModifier",
        file: "grpcroute-request-header-modifier.yaml",
        description: "A GRPCRoute with RequestHeaderModifier filter should modify request headers in mesh mode",
        features: &[MESH, GRPC_ROUTE],
        provisional: false,
        check: Check::Requests(vec![
            with(
                call("Set headers -- overwrites existing header", ECHO_V1, "echo-v1", "set"),
                &[
                    ("some-other-header", "this-header-should-be-set"),
                    ("x-header-set", "this-value-should-be-overwritten"),
                ],
            )
            .got_headers(&[
                ("x-test-case", "set"),
                ("some-other-header", "this-header-should-be-set"),
                ("x-header-set", "set-overwrites-values"),
            ]),
            with(
                call("Add headers -- appends to existing header", ECHO_V1, "echo-v1", "add"),
                &[("x-header-add", "this-value-should-be-appended")],
            )
            .got_headers(&[
                ("x-test-case", "add"),
                ("x-header-add", "this-value-should-be-appended,add-appends-values"),
            ]),
            with(
                call("Remove headers -- removes headers", ECHO_V1, "echo-v1", "remove"),
                &[("x-header-remove", "this-should-be-removed")],
            )
            .got_absent(&["x-header-remove"])
            .got_headers(&[("x-test-case", "remove")]),
            with(
                call("Multiple operations -- set, add, and remove headers", ECHO_V2, "echo-v2", "multi"),
                &[
                    ("x-header-set-2", "set-header-2"),
                    ("x-header-add-2", "add-header-2"),
                    ("x-header-remove-2", "should-be-removed-2"),
                ],
            )
            .got_absent(&["x-header-remove-1", "x-header-remove-2"])
            .got_headers(&[
                ("x-test-case", "multi"),
                ("x-header-set-1", "header-set-1"),
                ("x-header-set-2", "header-set-2"),
                ("x-header-add-1", "header-add-1"),
                ("x-header-add-2", "add-header-2,header-add-2"),
            ]),
        ]),
    }
}

/// The 303, 307 and 308 cases: one redirect each, path kept.
fn redirect_status(name: &'static str, file: &'static str, code: u16, path: &'static str) -> Case {
    let (description, features): (&'static str, &'static [&'static str]) = match code {
        303 => (
            "An HTTPRoute with statusCode 303 redirect filter",
            &[MESH, HTTP_ROUTE, "HTTPRoute303RedirectStatusCode"],
        ),
        307 => (
            "An HTTPRoute with statusCode 307 redirect filter",
            &[MESH, HTTP_ROUTE, "HTTPRoute307RedirectStatusCode"],
        ),
        _ => (
            "An HTTPRoute with statusCode 308 redirect filter",
            &[MESH, HTTP_ROUTE, "HTTPRoute308RedirectStatusCode"],
        ),
    };
    Case {
        name,
        file,
        description,
        features,
        provisional: true,
        check: Check::Requests(numbered(vec![Expect::get(path).status(code).redirect(
            Redirect {
                path: Some(path),
                ..Default::default()
            },
        )])),
    }
}

fn query_param_matching() -> Case {
    let v = |path: &str, backend| Expect::get(path).backend(backend);
    let none = |path: &str| Expect::get(path).status(404);
    Case {
        name: "MeshHTTPRouteQueryParamMatching",
        file: "httproute-query-param-matching.yaml",
        description: "A single HTTPRoute with query param matching for different backends",
        features: &[MESH, HTTP_ROUTE, "MeshHTTPRouteQueryParamMatching"],
        provisional: false,
        check: Check::Requests(numbered(vec![
            v("/?animal=whale", "echo-v1"),
            v("/?animal=dolphin", "echo-v2"),
            v("/?animal=whale&otherparam=irrelevant", "echo-v1"),
            v("/?animal=dolphin&color=yellow", "echo-v2"),
            none("/?color=blue"),
            none("/?animal=dog"),
            none("/?animal=whaledolphin"),
            none("/"),
            // Combinations with core match types.
            v("/path1?animal=whale", "echo-v1"),
            v("/?animal=whale", "echo-v2").headers(&[("version", "one")]),
            // Matches OR'd together match when only one is used.
            v("/path3?animal=shark", "echo-v1"),
            v("/path4?animal=kraken", "echo-v1").headers(&[("version", "three")]),
            // Matches AND'ed together need all of them.
            none("/?animal=shark"),
            none("/path4?animal=kraken"),
            // Precedence among several matching rules.
            v("/path5?animal=hydra", "echo-v1"),
        ])),
    }
}

fn redirect_path() -> Case {
    let r = |path: &str, code, host: Option<&'static str>, to: &'static str| {
        Expect::get(path).status(code).redirect(Redirect {
            host,
            path: Some(to),
            ..Default::default()
        })
    };
    Case {
        name: "MeshHTTPRouteRedirectPath",
        file: "httproute-redirect-path.yaml",
        description: "An HTTPRoute with scheme redirect filter",
        features: &[MESH, HTTP_ROUTE, "MeshHTTPRouteRedirectPath"],
        provisional: false,
        check: Check::Requests(numbered(vec![
            r(
                "/original-prefix/lemon",
                302,
                None,
                "/replacement-prefix/lemon",
            ),
            r("/full/path/original", 302, None, "/full-path-replacement"),
            r(
                "/path-and-host",
                302,
                Some("example.org"),
                "/replacement-prefix",
            ),
            r("/path-and-status", 301, None, "/replacement-prefix"),
            r(
                "/full-path-and-host",
                302,
                Some("example.org"),
                "/replacement-full",
            ),
            r("/full-path-and-status", 301, None, "/replacement-full"),
        ])),
    }
}

/// The port and scheme redirect cases: the same four requests (alone, with
/// a hostname, with 301, with a hostname and 302) around one redirect.
fn redirect_matrix(
    name: &'static str,
    file: &'static str,
    description: &'static str,
    features: &'static [&'static str],
    paths: [&str; 4],
    base: Redirect,
) -> Case {
    let r = |path: &str, code, host: Option<&'static str>| {
        Expect::get(path).status(code).redirect(Redirect {
            host,
            ..base.clone()
        })
    };
    Case {
        name,
        file,
        description,
        features,
        provisional: false,
        check: Check::Requests(numbered(vec![
            r(paths[0], 302, None),
            r(paths[1], 302, Some("example.org")),
            r(paths[2], 301, None),
            r(paths[3], 302, Some("example.org")),
        ])),
    }
}

fn redirect_port() -> Case {
    redirect_matrix(
        "MeshHTTPRouteRedirectPort",
        "httproute-redirect-port.yaml",
        "An HTTPRoute with a port redirect filter",
        &[MESH, HTTP_ROUTE, "MeshHTTPRouteRedirectPort"],
        [
            "/port",
            "/port-and-host",
            "/port-and-status",
            "/port-and-host-and-status",
        ],
        Redirect {
            port: Some("8083"),
            ..Default::default()
        },
    )
}

fn redirect_scheme() -> Case {
    redirect_matrix(
        "MeshHTTPRouteSchemeRedirect",
        "httproute-redirect-scheme.yaml",
        "An HTTPRoute with a scheme redirect filter",
        &[MESH, HTTP_ROUTE, "MeshHTTPRouteSchemeRedirect"],
        [
            "/scheme",
            "/scheme-and-host",
            "/scheme-and-status",
            "/scheme-and-host-and-status",
        ],
        Redirect {
            scheme: Some("https"),
            ..Default::default()
        },
    )
}

/// Shared by the rule-filter and backend-filter cases, as upstream.
fn request_header_modifier_expectations() -> Vec<Expect> {
    let e = |path: &'static str, sent: &[(&str, &str)]| {
        Expect::get(path)
            .headers(sent)
            .got_path(path)
            .backend("echo-v1")
    };
    numbered(vec![
        e("/set", &[("Some-Other-Header", "val")]).got_headers(&[
            ("Some-Other-Header", "val"),
            ("X-Header-Set", "set-overwrites-values"),
        ]),
        e(
            "/set",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Set", "some-other-value"),
            ],
        )
        .got_headers(&[
            ("Some-Other-Header", "val"),
            ("X-Header-Set", "set-overwrites-values"),
        ]),
        e("/add", &[("Some-Other-Header", "val")]).got_headers(&[
            ("Some-Other-Header", "val"),
            ("X-Header-Add", "add-appends-values"),
        ]),
        e(
            "/add",
            &[
                ("Some-Other-Header", "val"),
                ("X-Header-Add", "some-other-value"),
            ],
        )
        .got_headers(&[
            ("Some-Other-Header", "val"),
            ("X-Header-Add", "some-other-value,add-appends-values"),
        ]),
        e("/remove", &[("X-Header-Remove", "val")]).got_absent(&["X-Header-Remove"]),
        e(
            "/multiple",
            &[
                ("X-Header-Set-2", "set-val-2"),
                ("X-Header-Add-2", "add-val-2"),
                ("X-Header-Remove-2", "remove-val-2"),
                ("Another-Header", "another-header-val"),
            ],
        )
        .got_headers(&[
            ("X-Header-Set-1", "header-set-1"),
            ("X-Header-Set-2", "header-set-2"),
            ("X-Header-Add-1", "header-add-1"),
            ("X-Header-Add-2", "add-val-2,header-add-2"),
            ("X-Header-Add-3", "header-add-3"),
            ("Another-Header", "another-header-val"),
        ])
        .got_absent(&["X-Header-Remove-1", "X-Header-Remove-2"]),
        // The filter uses canonical header names, the request lower case.
        e(
            "/case-insensitivity",
            &[
                ("x-header-set", "original-val-set"),
                ("x-header-add", "original-val-add"),
                ("x-header-remove", "original-val-remove"),
                ("Another-Header", "another-header-val"),
            ],
        )
        .got_headers(&[
            ("X-Header-Set", "header-set"),
            ("X-Header-Add", "original-val-add,header-add"),
            ("Another-Header", "another-header-val"),
        ])
        .got_absent(&["x-header-remove", "X-Header-Remove"]),
    ])
}

fn rewrite_path() -> Case {
    let modify = [
        ("X-Header-Remove", "remove-val"),
        ("X-Header-Add-Append", "append-val-1"),
        ("X-Header-Set", "set-val"),
    ];
    let modified = [
        ("X-Header-Add", "header-val-1"),
        ("X-Header-Add-Append", "append-val-1,header-val-2"),
        ("X-Header-Set", "set-overwrites-values"),
    ];
    Case {
        name: "MeshHTTPRouteRewritePath",
        file: "httproute-rewrite-path.yaml",
        description: "An HTTPRoute with path rewrite filter",
        features: &[MESH, HTTP_ROUTE, "MeshHTTPRouteRewritePath"],
        provisional: false,
        check: Check::Requests(numbered(vec![
            Expect::get("/prefix/one/two")
                .got_path("/one/two")
                .backend("echo-v1"),
            Expect::get("/strip-prefix/three")
                .got_path("/three")
                .backend("echo-v1"),
            Expect::get("/strip-prefix")
                .got_path("/")
                .backend("echo-v1"),
            Expect::get("/full/one/two")
                .got_path("/one")
                .backend("echo-v1"),
            Expect::get("/full/rewrite-path-and-modify-headers/test")
                .headers(&modify)
                .got_path("/test")
                .got_headers(&modified)
                .got_absent(&["X-Header-Remove"])
                .backend("echo-v1"),
            Expect::get("/prefix/rewrite-path-and-modify-headers/one")
                .headers(&modify)
                .got_path("/prefix/one")
                .got_headers(&modified)
                .got_absent(&["X-Header-Remove"])
                .backend("echo-v1"),
        ])),
    }
}

/// Every feature named by a case (sorted, once each).
pub fn features() -> Vec<&'static str> {
    let mut f: Vec<&'static str> = all()
        .iter()
        .flat_map(|c| c.features.iter().copied())
        .collect();
    f.sort_unstable();
    f.dedup();
    f
}
