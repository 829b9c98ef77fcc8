//! The Kubernetes API as weftctl reads it: a kube-rs client (kubeconfig,
//! `KUBECONFIG`, or in-cluster) and plain JSON GETs and POSTs of API paths,
//! so built-in kinds, Weft's CRDs and the Gateway API read alike.

use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

/// A client from `kubeconfig`, else the default chain (`KUBECONFIG`,
/// `~/.kube/config`, in-cluster).
pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client> {
    let config = match kubeconfig {
        Some(p) => {
            let kc = kube::config::Kubeconfig::read_from(p)
                .with_context(|| format!("reading kubeconfig {}", p.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .context("kubeconfig")?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (kubeconfig, KUBECONFIG or in-cluster)")?,
    };
    kube::Client::try_from(config).context("building the Kubernetes client")
}

/// What a GET found.
pub enum Found {
    Object(Value),
    /// 404: the object, or the whole resource (an absent CRD).
    Missing,
}

pub struct Api {
    pub client: kube::Client,
}

impl Api {
    /// GET `path` (e.g. `/api/v1/nodes`).
    pub async fn get(&self, path: &str) -> Result<Found> {
        let req = http::Request::get(path)
            .body(Vec::new())
            .context("building a request")?;
        match self.client.request::<Value>(req).await {
            Ok(v) => Ok(Found::Object(v)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Found::Missing),
            Err(e) => Err(anyhow::Error::new(e).context(format!("GET {path}"))),
        }
    }

    /// The items of a list at `path`; an absent resource lists nothing.
    pub async fn list(&self, path: &str) -> Result<Vec<Value>> {
        Ok(match self.get(path).await? {
            Found::Object(v) => v["items"].as_array().cloned().unwrap_or_default(),
            Found::Missing => Vec::new(),
        })
    }

    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let req = http::Request::post(path)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?)
            .context("building a request")?;
        self.client
            .request::<Value>(req)
            .await
            .with_context(|| format!("POST {path}"))
    }
}

impl Api {
    /// Server-side apply of `obj` at `path` (which carries `fieldManager`).
    pub async fn apply(&self, path: &str, obj: &Value) -> Result<Value> {
        self.patch(path, "application/apply-patch+yaml", obj).await
    }

    /// JSON merge patch.
    pub async fn merge_patch(&self, path: &str, patch: &Value) -> Result<Value> {
        self.patch(path, "application/merge-patch+json", patch)
            .await
    }

    async fn patch(&self, path: &str, content_type: &str, body: &Value) -> Result<Value> {
        let req = http::Request::patch(path)
            .header("content-type", content_type)
            .body(serde_json::to_vec(body)?)
            .context("building a request")?;
        self.client
            .request::<Value>(req)
            .await
            .with_context(|| format!("PATCH {path}"))
    }

    pub async fn delete(&self, path: &str) -> Result<Found> {
        let req = http::Request::delete(path)
            .body(Vec::new())
            .context("building a request")?;
        match self.client.request::<Value>(req).await {
            Ok(v) => Ok(Found::Object(v)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Found::Missing),
            Err(e) => Err(anyhow::Error::new(e).context(format!("DELETE {path}"))),
        }
    }
}

/// `metadata.name` (or "").
pub fn name(v: &Value) -> &str {
    v["metadata"]["name"].as_str().unwrap_or("")
}

pub fn namespace(v: &Value) -> &str {
    v["metadata"]["namespace"].as_str().unwrap_or("")
}

/// `status.conditions[type]`: (status, reason, message).
pub fn condition<'a>(v: &'a Value, ty: &str) -> Option<(&'a str, &'a str, &'a str)> {
    v["status"]["conditions"].as_array()?.iter().find_map(|c| {
        (c["type"].as_str() == Some(ty)).then(|| {
            (
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or(""),
            )
        })
    })
}

/// A pod counts as ready when its Ready condition is True.
pub fn pod_ready(pod: &Value) -> bool {
    condition(pod, "Ready").is_some_and(|(s, _, _)| s == "True")
}
