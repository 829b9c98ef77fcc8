//! The ztunnel end of the CNI protocol (`weft_api::cni`): one JSON request
//! line, one JSON response line, per connection on a unix socket. The
//! plugin's ADD returns only after we answer, so a pod's traffic is captured
//! before its app starts. The socket is served from start-up on, before the
//! first mesh model: pods are remembered at once and answers say whether a
//! model is there, so the plugin can tell "not captured" from "not yet".

use std::path::Path;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};
use weft_api::cni::{CniCommand, CniRequest, CniResponse};

use crate::inpod::{InPod, PodInfo};

/// Longest request line accepted (a request is a few hundred bytes).
const MAX_REQUEST: usize = 64 * 1024;

/// Listens on `path`: bound beside it and renamed into place, so a plugin
/// never finds the path missing while a new ztunnel takes over from a
/// running one (whose socket it replaces).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| anyhow::anyhow!("cannot move the CNI socket to {}: {e}", path.display()))?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, inpod: Arc<InPod>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(handle(stream, inpod.clone()));
            }
            Err(e) => {
                warn!(component = "cni", error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(stream: UnixStream, inpod: Arc<InPod>) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(r, MAX_REQUEST as u64));
    let response = match reader.read_line(&mut line).await {
        Ok(0) => return,
        Ok(_) => match serde_json::from_str::<CniRequest>(line.trim()) {
            Ok(req) => answer(req, &inpod).await,
            Err(e) => error(format!("malformed CNI request: {e}"), inpod.has_model()),
        },
        Err(e) => error(format!("reading CNI request: {e}"), inpod.has_model()),
    };
    let mut out = serde_json::to_vec(&response).unwrap_or_default();
    out.push(b'\n');
    let _ = w.write_all(&out).await;
}

async fn answer(req: CniRequest, inpod: &InPod) -> CniResponse {
    if let Err(e) = req.check_names() {
        warn!(component = "cni", command = ?req.command, error = %e, "CNI request refused");
        return error(e.to_string(), inpod.has_model());
    }
    let pod = format!("{}/{}", req.pod_namespace, req.pod_name);
    let has_model = inpod.has_model();
    if req.command == CniCommand::Check && !has_model {
        return error(
            "this ztunnel has no mesh model yet: capture cannot be checked".into(),
            false,
        );
    }
    let result = match req.command {
        CniCommand::Add => {
            inpod
                .add(PodInfo {
                    namespace: req.pod_namespace.clone(),
                    name: req.pod_name.clone(),
                    container_id: req.container_id.clone(),
                    netns: req.netns.clone().into(),
                    ips: req.ips.clone(),
                })
                .await
        }
        CniCommand::Del => inpod
            .delete(&req.pod_namespace, &req.pod_name)
            .await
            .map(|_| false),
        CniCommand::Check => inpod.check(&req.pod_namespace, &req.pod_name).await,
    };
    match result {
        Ok(enrolled) => {
            info!(component = "cni", command = ?req.command, pod, enrolled, has_model, "CNI request done");
            CniResponse {
                ok: true,
                enrolled,
                has_model,
                error: None,
            }
        }
        Err(e) => {
            warn!(component = "cni", command = ?req.command, pod, error = %e, "CNI request failed");
            error(format!("{e:#}"), has_model)
        }
    }
}

fn error(msg: String, has_model: bool) -> CniResponse {
    CniResponse {
        ok: false,
        enrolled: false,
        has_model,
        error: Some(msg),
    }
}
