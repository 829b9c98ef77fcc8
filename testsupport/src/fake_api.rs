//! A fake Kubernetes API server for tests. No API server can run on the
//! development and CI machines, so this stands in for one: a hyper
//! HTTP/1.1 server (on 127.0.0.1, or on a listener the test made, e.g.
//! inside a network namespace) that answers the way the real one does for
//! the requests kube-rs makes:
//!
//! - `GET <collection>`: a List with `metadata.resourceVersion`;
//! - `GET <collection>?watch=true&resourceVersion=N&allowWatchBookmarks=true`:
//!   a stream of newline-delimited `{"type":"ADDED|MODIFIED|DELETED|BOOKMARK|ERROR","object":…}`
//!   with every change after N, held open for later ones; a version older
//!   than the last compaction (`expire_watches`) answers an `ERROR` event
//!   carrying a `Status` with code 410 reason `Expired`, as etcd compaction
//!   does, which forces the client to relist;
//! - `GET`, `PUT` (optimistic concurrency on `metadata.resourceVersion`,
//!   409 on conflict), `POST` (409 when it exists), `PATCH` (JSON merge
//!   patch; server-side apply, `application/apply-patch+yaml`, creates or
//!   merges) of single objects and of their `/status` subresource;
//! - `fieldSelector=metadata.name=<name>` on lists and watches (the one
//!   field selector every resource supports), and equality-based
//!   `labelSelector=k=v,k2=v2` on lists;
//! - `GET /version` (`set_version`);
//! - `POST` of a SelfSubjectAccessReview: allowed unless `deny_access`
//!   named the verb and resource;
//! - 404 with a `Status` for collections it was not told about (an absent
//!   CRD).
//!
//! Collections are named by their URL path without the namespace part,
//! e.g. `api/v1/pods` or `apis/weft.dev/v1alpha1/authorizationpolicies`.

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

pub const PODS: &str = "api/v1/pods";
pub const NAMESPACES: &str = "api/v1/namespaces";
pub const SERVICES: &str = "api/v1/services";
pub const SERVICE_ACCOUNTS: &str = "api/v1/serviceaccounts";
pub const ENDPOINT_SLICES: &str = "apis/discovery.k8s.io/v1/endpointslices";
pub const AUTHZ: &str = "apis/weft.dev/v1alpha1/authorizationpolicies";
pub const PEER_AUTHN: &str = "apis/weft.dev/v1alpha1/peerauthentications";
pub const GATEWAYS: &str = "apis/gateway.networking.k8s.io/v1/gateways";
pub const HTTP_ROUTES: &str = "apis/gateway.networking.k8s.io/v1/httproutes";
pub const GRPC_ROUTES: &str = "apis/gateway.networking.k8s.io/v1/grpcroutes";
pub const TRAFFIC_POLICIES: &str = "apis/weft.dev/v1alpha1/trafficpolicies";
pub const TOKEN_REVIEWS: &str = "apis/authentication.k8s.io/v1/tokenreviews";
pub const DEPLOYMENTS: &str = "apis/apps/v1/deployments";
pub const LEASES: &str = "apis/coordination.k8s.io/v1/leases";
pub const EVENTS: &str = "apis/events.k8s.io/v1/events";
pub const SECRETS: &str = "api/v1/secrets";
pub const NODES: &str = "api/v1/nodes";
pub const CONFIG_MAPS: &str = "api/v1/configmaps";
pub const NETWORK_POLICIES: &str = "apis/networking.k8s.io/v1/networkpolicies";
pub const CRDS: &str = "apis/apiextensions.k8s.io/v1/customresourcedefinitions";
pub const SELF_SUBJECT_ACCESS_REVIEWS: &str =
    "apis/authorization.k8s.io/v1/selfsubjectaccessreviews";

/// Everything `kube_source` needs, without the optional Gateway API kinds
/// (whose CRDs are absent unless a test adds the collections).
pub const WATCHED: &[&str] = &[
    NAMESPACES,
    PODS,
    SERVICES,
    SERVICE_ACCOUNTS,
    ENDPOINT_SLICES,
    AUTHZ,
    PEER_AUTHN,
    TRAFFIC_POLICIES,
];

/// The Gateway API kinds `kube_source` watches when their CRDs exist.
pub const GATEWAY_API: &[&str] = &[GATEWAYS, HTTP_ROUTES, GRPC_ROUTES];

type Key = (String, String); // (namespace or "", name)

#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Option<Value>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    collections: BTreeMap<String, BTreeMap<Key, Value>>,
    /// (collection, resourceVersion, type, object)
    log: Vec<(String, u64, &'static str, Value)>,
    /// Watches from a version older than this get 410 Gone.
    compacted: u64,
    /// Bumped by `expire_watches`: open watches answer 410 and close.
    epoch: u64,
    requests: Vec<Recorded>,
    /// TokenReview answers: token -> (audiences, `status.user`).
    tokens: BTreeMap<String, (Vec<String>, Value)>,
    /// `/version` as (major, minor).
    version: (String, String),
    /// (verb, resource) a SelfSubjectAccessReview is refused for.
    denied: BTreeSet<(String, String)>,
}

#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    tick: Arc<watch::Sender<u64>>,
    pub addr: SocketAddr,
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn key_of(obj: &Value) -> Key {
    let m = &obj["metadata"];
    (
        m["namespace"].as_str().unwrap_or("").to_owned(),
        m["name"].as_str().unwrap_or("").to_owned(),
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("just made an object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

impl FakeApi {
    /// Makes TokenReview authenticate `token` for `audiences` as `user` (a
    /// TokenReview `status.user`: username, uid, groups, extra), as the API
    /// server does for a bound ServiceAccount token.
    pub fn add_token(&self, token: &str, audiences: &[&str], user: Value) {
        self.inner.lock().unwrap().tokens.insert(
            token.to_owned(),
            (audiences.iter().map(|a| (*a).to_owned()).collect(), user),
        );
    }

    /// A TokenReview: authenticated when the token is known and, if the
    /// review names audiences, one of them is the token's (the API server's
    /// rule); otherwise `authenticated: false` with an error, answered 201
    /// like the real server.
    fn token_review(&self, body: Option<Value>) -> Response<BoxBody<Bytes, Infallible>> {
        let Some(mut review) = body else {
            return respond(400, status(400, "BadRequest", "no body"));
        };
        let token = review["spec"]["token"].as_str().unwrap_or("").to_owned();
        let asked: Vec<String> = review["spec"]["audiences"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let known = self.inner.lock().unwrap().tokens.get(&token).cloned();
        review["status"] = match known {
            Some((auds, user)) if asked.is_empty() || asked.iter().any(|a| auds.contains(a)) => {
                json!({ "authenticated": true, "user": user, "audiences": auds })
            }
            Some(_) => json!({ "authenticated": false, "error": "token audiences do not match" }),
            None => json!({ "authenticated": false, "error": "invalid bearer token" }),
        };
        respond(201, review)
    }

    /// What `GET /version` answers (default 1.33).
    pub fn set_version(&self, major: &str, minor: &str) {
        self.inner.lock().unwrap().version = (major.to_owned(), minor.to_owned());
    }

    /// Makes SelfSubjectAccessReviews for `verb` on `resource` (plural,
    /// e.g. `customresourcedefinitions`) answer not allowed.
    pub fn deny_access(&self, verb: &str, resource: &str) {
        self.inner
            .lock()
            .unwrap()
            .denied
            .insert((verb.to_owned(), resource.to_owned()));
    }

    /// A kubeconfig naming this server, for processes under test.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{ server: \"http://{}\" }}\nusers:\n- name: fake\n  user: {{ token: fake-token }}\ncontexts:\n- name: fake\n  context: {{ cluster: fake, user: fake }}\ncurrent-context: fake\n",
            self.addr
        )
    }

    fn access_review(&self, body: Option<Value>) -> Response<BoxBody<Bytes, Infallible>> {
        let Some(mut review) = body else {
            return respond(400, status(400, "BadRequest", "no body"));
        };
        let attrs = &review["spec"]["resourceAttributes"];
        let key = (
            attrs["verb"].as_str().unwrap_or("").to_owned(),
            attrs["resource"].as_str().unwrap_or("").to_owned(),
        );
        let denied = self.inner.lock().unwrap().denied.contains(&key);
        review["status"] = if denied {
            json!({ "allowed": false, "reason": "denied by the fake's policy" })
        } else {
            json!({ "allowed": true })
        };
        respond(201, review)
    }

    /// Starts the server with these (empty) collections.
    pub async fn start(collections: &[&str]) -> FakeApi {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::serve(listener, collections)
    }

    /// Like `start`, on a listener the caller bound (for instance inside a
    /// network namespace). Call inside a Tokio runtime.
    pub fn start_on(listener: std::net::TcpListener, collections: &[&str]) -> FakeApi {
        listener.set_nonblocking(true).unwrap();
        Self::serve(
            tokio::net::TcpListener::from_std(listener).unwrap(),
            collections,
        )
    }

    fn serve(listener: tokio::net::TcpListener, collections: &[&str]) -> FakeApi {
        let addr = listener.local_addr().unwrap();
        let mut inner = Inner {
            rv: 100,
            compacted: 0,
            version: ("1".into(), "33".into()),
            ..Default::default()
        };
        for c in collections {
            inner.collections.insert((*c).to_owned(), BTreeMap::new());
        }
        let fake = FakeApi {
            inner: Arc::new(Mutex::new(inner)),
            tick: Arc::new(watch::channel(0).0),
            addr,
        };
        let server = fake.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let server = server.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let server = server.clone();
                        async move { Ok::<_, Infallible>(server.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        fake
    }

    /// A kube client pointed at this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn bump(&self) {
        self.tick.send_modify(|t| *t += 1);
    }

    /// Creates or replaces an object (as a controller elsewhere or a user
    /// would), recording ADDED or MODIFIED. Returns its resourceVersion.
    pub fn apply(&self, collection: &str, mut obj: Value) -> u64 {
        let rv = {
            let mut g = self.inner.lock().unwrap();
            g.rv += 1;
            let rv = g.rv;
            let key = key_of(&obj);
            let coll = g.collections.entry(collection.to_owned()).or_default();
            let prev = coll.get(&key).cloned();
            let m = obj["metadata"]
                .as_object_mut()
                .expect("object has metadata");
            m.insert("resourceVersion".into(), json!(rv.to_string()));
            let (uid, generation) = match &prev {
                Some(p) => (
                    p["metadata"]["uid"].clone(),
                    p["metadata"]["generation"].as_i64().unwrap_or(1)
                        + i64::from(p.get("spec") != obj.get("spec")),
                ),
                None => (json!(format!("uid-{}-{rv}", key.1)), 1),
            };
            let m = obj["metadata"]
                .as_object_mut()
                .expect("object has metadata");
            m.entry("uid").or_insert(uid);
            m.insert("generation".into(), json!(generation));
            if obj.get("status").is_none() {
                if let Some(s) = prev.as_ref().and_then(|p| p.get("status")) {
                    obj["status"] = s.clone();
                }
            }
            let ty = if prev.is_some() { "MODIFIED" } else { "ADDED" };
            coll.insert(key, obj.clone());
            g.log.push((collection.to_owned(), rv, ty, obj));
            rv
        };
        self.bump();
        rv
    }

    pub fn delete(&self, collection: &str, namespace: &str, name: &str) {
        {
            let mut g = self.inner.lock().unwrap();
            g.rv += 1;
            let rv = g.rv;
            let key = (namespace.to_owned(), name.to_owned());
            let Some(mut obj) = g
                .collections
                .get_mut(collection)
                .and_then(|c| c.remove(&key))
            else {
                panic!("delete of a missing object {collection} {namespace}/{name}");
            };
            obj["metadata"]["resourceVersion"] = json!(rv.to_string());
            g.log.push((collection.to_owned(), rv, "DELETED", obj));
        }
        self.bump();
    }

    /// What etcd compaction does to watchers: every open watch receives an
    /// ERROR event with a 410 `Expired` Status and is closed, and a watch
    /// resumed from any version seen so far is refused the same way.
    pub fn expire_watches(&self) {
        {
            let mut g = self.inner.lock().unwrap();
            g.epoch += 1;
            g.compacted = g.rv + 1;
            g.rv += 1; // lists now answer with a version at or above `compacted`
        }
        self.bump();
    }

    pub fn get(&self, collection: &str, namespace: &str, name: &str) -> Option<Value> {
        let g = self.inner.lock().unwrap();
        g.collections
            .get(collection)
            .and_then(|c| c.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    pub fn list(&self, collection: &str) -> Vec<Value> {
        let g = self.inner.lock().unwrap();
        g.collections
            .get(collection)
            .map(|c| c.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Number of non-watch list requests for a collection so far.
    pub fn list_count(&self, collection: &str) -> usize {
        let path = format!("/{collection}");
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path == path && !r.query.contains("watch=true"))
            .count()
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<BoxBody<Bytes, Infallible>> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let content_type = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let body: Option<Value> = if body.is_empty() {
            None
        } else {
            serde_json::from_slice(&body).ok()
        };
        self.inner.lock().unwrap().requests.push(Recorded {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            content_type: content_type.clone(),
            body: body.clone(),
        });

        if path == "/version" && method == Method::GET {
            let (major, minor) = self.inner.lock().unwrap().version.clone();
            return respond(
                200,
                json!({"major": major, "minor": minor, "gitVersion": format!("v{major}.{minor}.0"), "platform": "linux/amd64"}),
            );
        }
        // Parse `/api/v1/...` or `/apis/<group>/<version>/...`.
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (prefix, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => (format!("api/{v}"), rest.to_vec()),
            ["apis", g, v, rest @ ..] => (format!("apis/{g}/{v}"), rest.to_vec()),
            _ => return respond(404, status(404, "NotFound", "no such path")),
        };
        // (namespace, plural, name, subresource)
        let (ns, plural, name, sub) = match rest.as_slice() {
            [plural] => (None, *plural, None, None),
            ["namespaces", name] => (None, "namespaces", Some(*name), None),
            ["namespaces", ns, plural] => (Some(*ns), *plural, None, None),
            ["namespaces", ns, plural, name] => (Some(*ns), *plural, Some(*name), None),
            ["namespaces", ns, plural, name, sub] => (Some(*ns), *plural, Some(*name), Some(*sub)),
            [plural, name] => (None, *plural, Some(*name), None),
            _ => return respond(404, status(404, "NotFound", "no such path")),
        };
        let collection = format!("{prefix}/{plural}");
        if collection == TOKEN_REVIEWS && method == Method::POST {
            return self.token_review(body);
        }
        if collection == SELF_SUBJECT_ACCESS_REVIEWS && method == Method::POST {
            return self.access_review(body);
        }
        if !self
            .inner
            .lock()
            .unwrap()
            .collections
            .contains_key(&collection)
        {
            return respond(
                404,
                status(
                    404,
                    "NotFound",
                    &format!("the server could not find the requested resource ({collection})"),
                ),
            );
        }
        let params: BTreeMap<String, String> = query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let key = name.map(|n| (ns.unwrap_or("").to_owned(), n.to_owned()));
        // `metadata.name=<n>`, URL-encoded or not.
        let only_name: Option<String> = params.get("fieldSelector").map(|f| {
            let f = f.replace("%3D", "=").replace("%3d", "=");
            f.strip_prefix("metadata.name=").unwrap_or(&f).to_owned()
        });
        let labels: Vec<(String, String)> = params
            .get("labelSelector")
            .map(|l| {
                let l = l
                    .replace("%3D", "=")
                    .replace("%3d", "=")
                    .replace("%2C", ",")
                    .replace("%2c", ",")
                    .replace("%2F", "/")
                    .replace("%2f", "/");
                l.split(',')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_owned(), v.trim_start_matches('=').to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let has_labels = |obj: &Value| {
            labels
                .iter()
                .all(|(k, v)| obj["metadata"]["labels"][k].as_str() == Some(v.as_str()))
        };

        match (method, key) {
            (Method::GET, None) if params.get("watch").map(String::as_str) == Some("true") => {
                let from: u64 = params
                    .get("resourceVersion")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let bookmarks =
                    params.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                self.watch(
                    collection,
                    ns.map(str::to_owned),
                    only_name,
                    from,
                    bookmarks,
                )
            }
            (Method::GET, None) => {
                let g = self.inner.lock().unwrap();
                let items: Vec<Value> = g.collections[&collection]
                    .iter()
                    .filter(|((ons, _), _)| ns.is_none_or(|n| n == ons.as_str()))
                    .filter(|((_, oname), _)| only_name.as_ref().is_none_or(|n| n == oname))
                    .filter(|(_, v)| has_labels(v))
                    .map(|(_, v)| v.clone())
                    .collect();
                respond(
                    200,
                    json!({
                        "apiVersion": "v1", "kind": "List",
                        "metadata": { "resourceVersion": g.rv.to_string() },
                        "items": items,
                    }),
                )
            }
            (Method::GET, Some(key)) => match self.get(&collection, &key.0, &key.1) {
                Some(obj) => respond(200, obj),
                None => respond(
                    404,
                    status(404, "NotFound", &format!("{plural} {:?} not found", key.1)),
                ),
            },
            (Method::POST, None) => {
                let Some(mut obj) = body else {
                    return respond(400, status(400, "BadRequest", "no body"));
                };
                if let Some(ns) = ns {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                if obj["metadata"]["name"].is_null() {
                    if let Some(prefix) = obj["metadata"]["generateName"].as_str() {
                        let n = format!("{prefix}{}", self.inner.lock().unwrap().rv);
                        obj["metadata"]["name"] = json!(n);
                    }
                }
                let key = key_of(&obj);
                if self.get(&collection, &key.0, &key.1).is_some() {
                    return respond(
                        409,
                        status(
                            409,
                            "AlreadyExists",
                            &format!("{plural} {:?} already exists", key.1),
                        ),
                    );
                }
                self.apply(&collection, obj);
                respond(
                    201,
                    self.get(&collection, &key.0, &key.1).unwrap_or_default(),
                )
            }
            (Method::PUT, Some(key)) => {
                let Some(mut obj) = body else {
                    return respond(400, status(400, "BadRequest", "no body"));
                };
                // The namespace comes from the URL, as on the real server.
                if let Some(ns) = ns {
                    obj["metadata"]["namespace"] = json!(ns);
                }
                let Some(cur) = self.get(&collection, &key.0, &key.1) else {
                    return respond(404, status(404, "NotFound", "not found"));
                };
                let want = obj["metadata"]["resourceVersion"].as_str();
                if want.is_some_and(|w| Some(w) != cur["metadata"]["resourceVersion"].as_str()) {
                    return respond(
                        409,
                        status(409, "Conflict", "Operation cannot be fulfilled: the object has been modified; please apply your changes to the latest version and try again"),
                    );
                }
                self.apply(&collection, obj);
                respond(
                    200,
                    self.get(&collection, &key.0, &key.1).unwrap_or_default(),
                )
            }
            (Method::PATCH, Some(key)) if content_type == "application/apply-patch+yaml" => {
                // Server-side apply: creates, or merges into what is there
                // (the fake does not track field managers).
                let Some(mut patch) = body else {
                    return respond(400, status(400, "BadRequest", "no body"));
                };
                if !params.contains_key("fieldManager") {
                    return respond(
                        400,
                        status(
                            400,
                            "BadRequest",
                            "fieldManager is required for apply patch",
                        ),
                    );
                }
                patch["metadata"]["namespace"] = json!(key.0);
                let mut cur = self.get(&collection, &key.0, &key.1).unwrap_or(json!({}));
                merge_patch(&mut cur, &patch);
                if collection == SERVICES && cur["spec"]["clusterIP"].is_null() {
                    // The API server allocates a ClusterIP.
                    let n = self.inner.lock().unwrap().rv % 250 + 1;
                    let ip = format!("10.96.200.{n}");
                    cur["spec"]["clusterIP"] = json!(ip);
                    cur["spec"]["clusterIPs"] = json!([ip]);
                }
                self.apply(&collection, cur);
                respond(
                    200,
                    self.get(&collection, &key.0, &key.1).unwrap_or_default(),
                )
            }
            (Method::PATCH, Some(key)) => {
                let Some(patch) = body else {
                    return respond(400, status(400, "BadRequest", "no body"));
                };
                let Some(mut cur) = self.get(&collection, &key.0, &key.1) else {
                    return respond(404, status(404, "NotFound", "not found"));
                };
                match sub {
                    // The status subresource only changes status.
                    Some("status") => merge_patch(&mut cur["status"], &patch["status"]),
                    _ => merge_patch(&mut cur, &patch),
                }
                self.apply(&collection, cur);
                respond(
                    200,
                    self.get(&collection, &key.0, &key.1).unwrap_or_default(),
                )
            }
            (Method::DELETE, Some(key)) => {
                self.delete(&collection, &key.0, &key.1);
                respond(200, status(200, "", "deleted"))
            }
            _ => respond(
                405,
                status(405, "MethodNotAllowed", "not supported by the fake"),
            ),
        }
    }

    fn watch(
        &self,
        collection: String,
        ns: Option<String>,
        only_name: Option<String>,
        from: u64,
        bookmarks: bool,
    ) -> Response<BoxBody<Bytes, Infallible>> {
        let (tx, rx) = mpsc::channel::<Bytes>(64);
        let inner = self.inner.clone();
        let mut tick = self.tick.subscribe();
        tokio::spawn(async move {
            let line = |v: Value| Bytes::from(format!("{v}\n"));
            let gone = |rv: u64| {
                line(json!({"type": "ERROR", "object": status(410, "Expired",
                    &format!("too old resource version: {rv}"))}))
            };
            let (start_epoch, expired) = {
                let g = inner.lock().unwrap();
                (g.epoch, from < g.compacted)
            };
            if expired {
                let _ = tx.send(gone(from)).await;
                return;
            }
            let mut last = from;
            let mut sent_bookmark = false;
            loop {
                let (lines, epoch, rv) = {
                    let g = inner.lock().unwrap();
                    let lines: Vec<(u64, Bytes)> = g
                        .log
                        .iter()
                        .filter(|(c, rv, _, obj)| {
                            *c == collection
                                && *rv > last
                                && ns.as_deref().is_none_or(|n| key_of(obj).0 == n)
                                && only_name.as_deref().is_none_or(|n| key_of(obj).1 == n)
                        })
                        .map(|(_, rv, ty, obj)| (*rv, line(json!({"type": ty, "object": obj}))))
                        .collect();
                    (lines, g.epoch, g.rv)
                };
                if epoch != start_epoch {
                    let _ = tx.send(gone(last)).await;
                    return;
                }
                for (rv, l) in lines {
                    last = rv;
                    if tx.send(l).await.is_err() {
                        return;
                    }
                }
                if bookmarks && !sent_bookmark {
                    sent_bookmark = true;
                    let bm = json!({"type": "BOOKMARK", "object": {
                        "kind": "Pod", "apiVersion": "v1",
                        "metadata": {"resourceVersion": rv.to_string()}}});
                    if tx.send(line(bm)).await.is_err() {
                        return;
                    }
                    last = last.max(rv);
                }
                tokio::select! {
                    r = tick.changed() => if r.is_err() { return },
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
        }));
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(BodyExt::boxed(body))
            .expect("valid response")
    }
}

fn respond(code: u16, v: Value) -> Response<BoxBody<Bytes, Infallible>> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("valid response")
}

/// Waits until `pred` holds for the value in `rx` (checked at once, then
/// on every change), or panics after `secs` seconds with `what`.
pub async fn wait_for<T: Clone, F: FnMut(&T) -> bool>(
    rx: &mut watch::Receiver<T>,
    secs: u64,
    what: &str,
    mut pred: F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        {
            let v = rx.borrow_and_update().clone();
            if pred(&v) {
                return v;
            }
        }
        match tokio::time::timeout_at(deadline, rx.changed()).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => panic!("sender dropped while waiting for: {what}"),
            Err(_) => panic!("timed out waiting for: {what}"),
        }
    }
}

pub fn namespace(name: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

pub fn pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

pub fn service(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"clusterIP": ip, "clusterIPs": [ip], "selector": {"app": name},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

pub fn waypoint_gateway(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"gatewayClassName": "weft-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

pub fn http_route(ns: &str, name: &str, parent: &str, backend: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": parent, "port": 80}],
            "rules": [{"backendRefs": [{"name": backend, "port": 80}]}],
        },
    })
}

pub fn set_of(names: impl IntoIterator<Item = impl Into<String>>) -> BTreeSet<String> {
    names.into_iter().map(Into::into).collect()
}
