//! The cluster state from the API server: one kube-rs reflector (watcher
//! with the default backoff, relisting after `410 Gone`) per watched kind,
//! all feeding one `ClusterState`. Any change wakes a debounced rebuild
//! through `model::build`; the model is published only when it
//! changed. Nothing here polls the API server.

use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use futures::{Future, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use weft_api::crd::{
    AuthorizationPolicy, GRPCRoute, Gateway, HTTPRoute, PeerAuthentication, TrafficPolicy,
};
use weft_api::MeshModel;

use crate::model::{self, ClusterState, GatewayApiOutput, PolicyStatus};

/// The least time between the starts of two rebuilds. A change after a
/// quiet spell is built at once (no added latency); the changes of a burst
/// (a rollout, a relist) are folded into at most one rebuild per interval.
pub const MIN_REBUILD_INTERVAL: Duration = Duration::from_millis(100);
/// How often the controller looks again for the Gateway API CRD when it is
/// not installed.
pub const GATEWAY_CRD_RECHECK: Duration = Duration::from_secs(30);

/// Readers of every reflector store.
#[derive(Clone)]
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    services: Store<Service>,
    endpoint_slices: Store<EndpointSlice>,
    service_accounts: Store<ServiceAccount>,
    authorization_policies: Store<AuthorizationPolicy>,
    peer_authentications: Store<PeerAuthentication>,
    traffic_policies: Store<TrafficPolicy>,
    gateways: Store<Gateway>,
    http_routes: Store<HTTPRoute>,
    grpc_routes: Store<GRPCRoute>,
}

impl Stores {
    fn snapshot(&self) -> ClusterState {
        ClusterState {
            namespaces: self.namespaces.state(),
            pods: self.pods.state(),
            services: self.services.state(),
            endpoint_slices: self.endpoint_slices.state(),
            service_accounts: self.service_accounts.state(),
            authorization_policies: self.authorization_policies.state(),
            peer_authentications: self.peer_authentications.state(),
            gateways: self.gateways.state(),
            http_routes: self.http_routes.state(),
            grpc_routes: self.grpc_routes.state(),
            traffic_policies: self.traffic_policies.state(),
        }
    }
}

/// Watches the cluster through `client` and keeps `out` (the mesh model),
/// `status` (the `Accepted` condition each policy should carry) and
/// `gateway_api` (Gateway and route status, waypoints to deploy) up to
/// date. The first model is published once every required reflector has
/// listed its kind (the Gateway API watches are optional: without the
/// Gateway API CRDs they are skipped with a warning and retried every 30 s). Watch errors
/// are logged and retried with kube-rs's default backoff; the function only
/// returns if a reflector task ends, which does not happen in normal
/// operation, or when both receivers are gone.
pub async fn run(
    client: Client,
    trust_domain: String,
    out: watch::Sender<Arc<MeshModel>>,
    status: watch::Sender<Arc<Vec<PolicyStatus>>>,
    gateway_api: watch::Sender<Arc<GatewayApiOutput>>,
) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let mut tasks = tokio::task::JoinSet::new();

    macro_rules! reflect {
        ($k:ty) => {{
            let (store, task) = reflect::<$k>(Api::all(client.clone()), changed.clone());
            tasks.spawn(task);
            store
        }};
    }
    let stores = Stores {
        namespaces: reflect!(Namespace),
        pods: reflect!(Pod),
        services: reflect!(Service),
        endpoint_slices: reflect!(EndpointSlice),
        service_accounts: reflect!(ServiceAccount),
        authorization_policies: reflect!(AuthorizationPolicy),
        peer_authentications: reflect!(PeerAuthentication),
        traffic_policies: reflect!(TrafficPolicy),
        gateways: {
            let (store, writer) = reflector::store();
            tasks.spawn(watch_optional::<Gateway>(
                client.clone(),
                writer,
                changed.clone(),
            ));
            store
        },
        http_routes: {
            let (store, writer) = reflector::store();
            tasks.spawn(watch_optional::<HTTPRoute>(
                client.clone(),
                writer,
                changed.clone(),
            ));
            store
        },
        grpc_routes: {
            let (store, writer) = reflector::store();
            tasks.spawn(watch_optional::<GRPCRoute>(
                client.clone(),
                writer,
                changed.clone(),
            ));
            store
        },
    };

    let builder = async {
        wait_ready(&stores).await?;
        tracing::info!(component = "kube_source", "initial lists done");
        loop {
            let started = tokio::time::Instant::now();
            let built = model::build(&stores.snapshot(), &trust_domain);
            for p in &built.problems {
                tracing::debug!(component = "kube_source", problem = %p, "cluster state problem");
            }
            built.publish(&out, &status, &gateway_api);
            if out.is_closed() && status.is_closed() && gateway_api.is_closed() {
                return Ok(());
            }
            changed.notified().await;
            tokio::time::sleep_until(started + MIN_REBUILD_INTERVAL).await;
        }
    };
    tokio::select! {
        r = builder => r,
        Some(ended) = tasks.join_next() => {
            anyhow::bail!("a reflector task ended unexpectedly: {ended:?}")
        }
    }
}

async fn wait_ready(s: &Stores) -> anyhow::Result<()> {
    let r = tokio::try_join!(
        s.namespaces.wait_until_ready(),
        s.pods.wait_until_ready(),
        s.services.wait_until_ready(),
        s.endpoint_slices.wait_until_ready(),
        s.service_accounts.wait_until_ready(),
        s.authorization_policies.wait_until_ready(),
        s.peer_authentications.wait_until_ready(),
        s.traffic_policies.wait_until_ready(),
    );
    r.map(|_| ())
        .map_err(|e| anyhow::anyhow!("a reflector stopped before its first list: {e}"))
}

/// A reflector on `api` whose every change wakes `changed`.
fn reflect<K>(
    api: Api<K>,
    changed: Arc<Notify>,
) -> (Store<K>, impl Future<Output = ()> + Send + 'static)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let (store, writer) = reflector::store();
    (store, drive(api, writer, changed))
}

async fn drive<K>(api: Api<K>, writer: reflector::store::Writer<K>, changed: Arc<Notify>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
{
    let kind = K::kind(&Default::default()).into_owned();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        // managedFields are large and never read.
        .modify(|o| o.managed_fields_mut().clear())
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    while let Some(ev) = stream.next().await {
        match ev {
            Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => {
                changed.notify_one();
            }
            Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
            Err(e) => {
                tracing::warn!(component = "kube_source", kind = %kind, error = %e, "watch failed; retrying with backoff");
            }
        }
    }
}

/// Gateway API is optional: while a kind's CRD is missing (the list
/// answers 404), warn and look again later instead of failing the
/// controller.
async fn watch_optional<K>(
    client: Client,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let kind = K::kind(&());
    let plural = K::plural(&());
    let group = K::group(&());
    let api: Api<K> = Api::all(client);
    let mut warned = false;
    loop {
        match api.list(&ListParams::default().limit(1)).await {
            Ok(_) => break,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                if !warned {
                    tracing::warn!(
                        component = "kube_source",
                        kind = %kind,
                        "the Gateway API CRD {plural}.{group} is not installed; waypoints and routes are unavailable until it is"
                    );
                    warned = true;
                }
            }
            Err(e) => {
                tracing::warn!(component = "kube_source", kind = %kind, error = %e, "cannot list; retrying");
            }
        }
        tokio::time::sleep(GATEWAY_CRD_RECHECK).await;
    }
    if warned {
        tracing::info!(component = "kube_source", kind = %kind, "Gateway API CRD found; watching");
    }
    drive(api, writer, changed).await;
}
