//! The CA root kept in a Kubernetes Secret (cluster mode): keys
//! `root-cert.pem`, `root-key.pem` and, during a rotation overlap,
//! `previous-roots.pem`, `cross-signed.pem` and `rotated-at`. Created on first start; replicas
//! racing to create it settle on whichever create won (the loser reloads).
//! An operator asks for a rotation with the annotation
//! `weft.dev/rotate-root` on the Secret; every replica watches the Secret
//! (by name) to follow rotations.
//!
//! Also the CA's other Kubernetes objects: a user-supplied intermediate
//! read from a Secret ([`read_intermediate`]), and the ConfigMap the trust
//! bundle is published in ([`publish_trust_bundle`]).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Api;

use weft_pki::files::{ROOT_CERT_FILE, ROOT_KEY_FILE};
use weft_pki::pem::split_certs;
use weft_pki::TrustBundle;

use super::error::CaError;
use super::store::{
    RootStore, StoredRoots, CROSS_SIGNED_FILE, PREVIOUS_ROOTS_FILE, ROTATED_AT_FILE,
    ROTATE_ANNOTATION,
};

pub struct SecretRootStore {
    api: Api<Secret>,
    name: String,
}

impl SecretRootStore {
    pub fn new(client: kube::Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
        }
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn storage(e: impl std::fmt::Display) -> CaError {
    CaError::Store(e.to_string())
}

#[tonic::async_trait]
impl RootStore for SecretRootStore {
    async fn load(&self) -> Result<Option<StoredRoots>, CaError> {
        let Some(secret) = self.api.get_opt(&self.name).await.map_err(storage)? else {
            return Ok(None);
        };
        let rotation_requested = secret
            .metadata
            .annotations
            .as_ref()
            .is_some_and(|a| a.contains_key(ROTATE_ANNOTATION));
        let data = secret.data.unwrap_or_default();
        let (Some(cert_pem), Some(key_pem)) =
            (text(&data, ROOT_CERT_FILE), text(&data, ROOT_KEY_FILE))
        else {
            return Err(storage(format!(
                "Secret {} lacks {ROOT_CERT_FILE} or {ROOT_KEY_FILE}; delete it to let the controller make a new root",
                self.name
            )));
        };
        let previous_roots_pem = text(&data, PREVIOUS_ROOTS_FILE)
            .map(|p| split_certs(&p))
            .unwrap_or_default();
        Ok(Some(StoredRoots {
            cert_pem,
            key_pem,
            previous_roots_pem,
            cross_signed_pem: text(&data, CROSS_SIGNED_FILE)
                .map(|p| split_certs(&p))
                .unwrap_or_default(),
            rotated_at_unix: text(&data, ROTATED_AT_FILE).and_then(|t| t.trim().parse().ok()),
            rotation_requested,
        }))
    }

    async fn save(&self, roots: &StoredRoots) -> Result<(), CaError> {
        let mut data = BTreeMap::new();
        data.insert(
            ROOT_CERT_FILE.to_owned(),
            ByteString(roots.cert_pem.clone().into_bytes()),
        );
        data.insert(
            ROOT_KEY_FILE.to_owned(),
            ByteString(roots.key_pem.clone().into_bytes()),
        );
        if !roots.previous_roots_pem.is_empty() {
            data.insert(
                PREVIOUS_ROOTS_FILE.to_owned(),
                ByteString(roots.previous_roots_pem.concat().into_bytes()),
            );
        }
        if !roots.cross_signed_pem.is_empty() {
            data.insert(
                CROSS_SIGNED_FILE.to_owned(),
                ByteString(roots.cross_signed_pem.concat().into_bytes()),
            );
        }
        if let Some(t) = roots.rotated_at_unix {
            data.insert(
                ROTATED_AT_FILE.to_owned(),
                ByteString(t.to_string().into_bytes()),
            );
        }
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                ..Default::default()
            },
            data: Some(data),
            type_: Some("Opaque".to_owned()),
            ..Default::default()
        };
        match self.api.get_opt(&self.name).await.map_err(storage)? {
            None => self
                .api
                .create(&PostParams::default(), &secret)
                .await
                .map(|_| ())
                .map_err(storage),
            Some(existing) => {
                // Labels and annotations (a pending rotation request among
                // them) stay as they are.
                let mut updated = secret;
                updated.metadata.resource_version = existing.metadata.resource_version;
                updated.metadata.labels = existing.metadata.labels;
                updated.metadata.annotations = existing.metadata.annotations;
                self.api
                    .replace(&self.name, &PostParams::default(), &updated)
                    .await
                    .map(|_| ())
                    .map_err(storage)
            }
        }
    }

    async fn clear_rotation_request(&self) -> Result<(), CaError> {
        let patch =
            serde_json::json!({ "metadata": { "annotations": { ROTATE_ANNOTATION: null } } });
        self.api
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(storage)
    }

    /// A watch on this one Secret (by name); errors back off and retry.
    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        use futures::StreamExt;
        let cfg = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        watcher(self.api.clone(), cfg)
            .default_backoff()
            .map(|_| ())
            .boxed()
    }
}

/// A user-supplied intermediate from a Secret: (intermediate certificate,
/// its key, the issuers above it up to the root).
pub async fn read_intermediate(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<(String, String, String)> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let secret = api.get_opt(name).await?.ok_or_else(|| {
        anyhow::anyhow!("CA Secret {namespace}/{name} does not exist (ca.existingSecret)")
    })?;
    let data = secret.data.unwrap_or_default();
    let need = |key: &str| {
        text(&data, key).ok_or_else(|| anyhow::anyhow!("CA Secret {namespace}/{name} has no {key}"))
    };
    let blocks = split_certs(&need("tls.crt")?);
    let Some((intermediate, above)) = blocks.split_first() else {
        anyhow::bail!("CA Secret {namespace}/{name}: tls.crt holds no certificate");
    };
    let chain = above.concat() + &need("ca.crt")?;
    Ok((intermediate.clone(), need("tls.key")?, chain))
}

/// Keeps ConfigMap `namespace/name` (key `root-cert.pem`) equal to the trust
/// bundle, so ztunnels can verify the controller's TLS serving certificate
/// before they have any other contact with it. Runs until the bundle's
/// sender is gone.
pub async fn publish_trust_bundle(
    client: kube::Client,
    namespace: String,
    name: String,
    mut bundle: tokio::sync::watch::Receiver<TrustBundle>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    loop {
        let pem = bundle.borrow_and_update().to_pem();
        let mut delay = std::time::Duration::from_secs(1);
        loop {
            match write_config_map(&api, &name, &pem).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(component = "ca", configmap = %name, error = %e, "cannot publish the root certificate; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
        if bundle.changed().await.is_err() {
            return;
        }
    }
}

async fn write_config_map(api: &Api<ConfigMap>, name: &str, pem: &str) -> Result<(), kube::Error> {
    let mut data = BTreeMap::new();
    data.insert(ROOT_CERT_FILE.to_owned(), pem.to_owned());
    let mut cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    match api.get_opt(name).await? {
        None => api.create(&PostParams::default(), &cm).await.map(|_| ()),
        Some(existing) if existing.data == cm.data => Ok(()),
        Some(existing) => {
            cm.metadata.resource_version = existing.metadata.resource_version;
            api.replace(name, &PostParams::default(), &cm)
                .await
                .map(|_| ())
        }
    }
}
