//! What the plugin asks the Kubernetes API: a pod's namespace labels and
//! its own labels and `hostNetwork`, with the kubeconfig the installer
//! writes (server, CA file, token file). The API server is up whenever the
//! kubelet is creating pods, unlike the controller and the ztunnel, so this
//! is how a node keeps starting pods that stay out of the mesh while Weft
//! is half there. The rule itself is the mesh model's
//! (`MeshModel::is_captured`), the same the controller and ztunnel apply.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::Value;
use weft_api::model::{MeshModel, Namespace, Workload};

/// Each API request (connect, TLS, answer) is bounded by this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// A Namespace or Pod object is far smaller.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Whether the pod `namespace/name` is to be captured, by its namespace's
/// `weft.dev/dataplane-mode` label and its own.
pub fn belongs_in_mesh(kubeconfig: &Path, namespace: &str, name: &str) -> Result<bool> {
    let api = Api::load(kubeconfig)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let ns = api
            .get(&format!("/api/v1/namespaces/{namespace}"))
            .await?
            .ok_or_else(|| anyhow!("namespace {namespace} not found"))?;
        let mut model = MeshModel {
            namespaces: vec![Namespace {
                name: namespace.to_owned(),
                labels: labels(&ns),
            }],
            ..Default::default()
        };
        let mut pod = Workload {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            ..Default::default()
        };
        // Without the namespace label the pod's own labels cannot enroll it.
        if !model.is_captured(&pod) {
            return Ok(false);
        }
        let obj = api
            .get(&format!("/api/v1/namespaces/{namespace}/pods/{name}"))
            .await?
            .ok_or_else(|| anyhow!("pod {namespace}/{name} not found"))?;
        if obj["spec"]["hostNetwork"].as_bool() == Some(true) {
            return Ok(false);
        }
        pod.labels = labels(&obj);
        model.workloads.push(pod);
        Ok(model.is_captured(&model.workloads[0]))
    })
}

fn labels(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of a kubeconfig the plugin uses.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Kubeconfig {
    #[serde(default)]
    clusters: Vec<Named<ClusterEntry>>,
    #[serde(default)]
    users: Vec<Named<UserEntry>>,
    #[serde(default)]
    contexts: Vec<Named<ContextEntry>>,
    #[serde(default)]
    current_context: String,
}

#[derive(Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ClusterEntry {
    server: String,
    #[serde(default)]
    certificate_authority: Option<String>,
    #[serde(default)]
    certificate_authority_data: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UserEntry {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    token_file: Option<String>,
}

#[derive(Deserialize)]
struct ContextEntry {
    cluster: String,
    user: String,
}

struct Api {
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<(
        Arc<rustls::ClientConfig>,
        rustls::pki_types::ServerName<'static>,
    )>,
    token: Option<String>,
}

impl Api {
    fn load(path: &Path) -> Result<Api> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading kubeconfig {}", path.display()))?;
        let kc: Kubeconfig = serde_yaml::from_str(&text)
            .with_context(|| format!("parsing kubeconfig {}", path.display()))?;
        let ctx = kc
            .contexts
            .iter()
            .find(|c| c.name == kc.current_context)
            .or(kc.contexts.first())
            .map(|c| &c.value);
        let cluster = match ctx {
            Some(c) => kc.clusters.iter().find(|e| e.name == c.cluster),
            None => kc.clusters.first(),
        }
        .map(|c| &c.value)
        .ok_or_else(|| anyhow!("{}: no cluster", path.display()))?;
        let user = ctx
            .and_then(|c| kc.users.iter().find(|u| u.name == c.user))
            .map(|u| &u.value);
        let token = match user {
            Some(UserEntry { token: Some(t), .. }) => Some(t.trim().to_owned()),
            Some(UserEntry {
                token_file: Some(f),
                ..
            }) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading token file {f}"))?
                    .trim()
                    .to_owned(),
            ),
            _ => None,
        };
        let uri: http::Uri = cluster
            .server
            .parse()
            .with_context(|| format!("server {:?}", cluster.server))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => bail!(
                "server {:?} is neither https:// nor http://",
                cluster.server
            ),
        };
        let host = uri
            .host()
            .ok_or_else(|| anyhow!("server {:?} has no host", cluster.server))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            if cluster.certificate_authority_data.is_some() {
                bail!("certificate-authority-data is not supported: name a file in certificate-authority");
            }
            let ca = cluster
                .certificate_authority
                .as_ref()
                .ok_or_else(|| anyhow!("https server without certificate-authority"))?;
            let pem = std::fs::read_to_string(ca).with_context(|| format!("reading {ca}"))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in weft_pki::pem::certs_from_pem(&pem).with_context(|| ca.clone())? {
                roots
                    .add(cert)
                    .with_context(|| format!("a certificate of {ca}"))?;
            }
            let config = rustls::ClientConfig::builder_with_provider(weft_hbone::tls::provider())
                .with_safe_default_protocol_versions()?
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .with_context(|| format!("server name {host:?}"))?;
            Some((Arc::new(config), name))
        } else {
            None
        };
        Ok(Api {
            uri,
            host,
            port,
            tls,
            token,
        })
    }

    /// GET `path`: the JSON object, or `None` for 404.
    async fn get(&self, path: &str) -> Result<Option<Value>> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.get_inner(path))
            .await
            .map_err(|_| anyhow!("no answer from {} within {REQUEST_TIMEOUT:?}", self.uri))?
    }

    async fn get_inner(&self, path: &str) -> Result<Option<Value>> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("connecting to {}", self.uri))?;
        let authority = self
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_default();
        let mut req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "weft-cni");
        if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let resp = match &self.tls {
            Some((config, name)) => {
                let stream = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS to {}", self.uri))?;
                send(stream, req).await?
            }
            None => send(tcp, req).await?,
        };
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| anyhow!("reading the answer to GET {path}: {e}"))?
            .to_bytes();
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            bail!(
                "GET {path}: {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        Ok(Some(serde_json::from_slice(&body).with_context(|| {
            format!("GET {path}: the answer is not JSON")
        })?))
    }
}

async fn send<S>(
    stream: S,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}
