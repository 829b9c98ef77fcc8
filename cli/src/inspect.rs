//! Inspection: `proxy-status` (every config stream: versions sent and
//! acknowledged, the last NACK and its reason), `workloads`, `services`,
//! `policies` (the model the controller serves, or offline the model built
//! from a folder of manifests by the controller's own builder), `certs`
//! (each node's workload certificates) and `ztunnel config NODE`.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_api::node_report::NodeReport;
use weft_api::{ports, MeshModel};

use crate::check::cluster::{
    pod_ip, streams, CONTROLLER, CONTROLLER_METRICS_PORT, NAME_LABEL, ZTUNNEL,
};
use crate::check::node::human;
use crate::http_get;
use crate::kube_api::{name, Api};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

/// Prints `rows` (first the header) as a table, or `data` as JSON/YAML.
pub fn print(format: Format, data: &Value, rows: Vec<Vec<String>>) -> Result<()> {
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(data)?),
        Format::Yaml => print!("{}", serde_yaml::to_string(data)?),
        Format::Table => {
            let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
                .map(|i| {
                    rows.iter()
                        .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            for r in rows {
                let line: Vec<String> = r
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect();
                println!("{}", line.join("  ").trim_end());
            }
        }
    }
    Ok(())
}

async fn pods_named(api: &Api, ns: &str, label: &str) -> Result<Vec<Value>> {
    Ok(api
        .list(&format!("/api/v1/namespaces/{ns}/pods"))
        .await?
        .into_iter()
        .filter(|p| p["metadata"]["labels"][NAME_LABEL].as_str() == Some(label))
        .collect())
}

/// The controller's metrics address: `--controller`, else the first
/// controller pod with an IP.
pub async fn controller_addr(
    api: Option<&Api>,
    ns: &str,
    given: Option<SocketAddr>,
) -> Result<SocketAddr> {
    if let Some(a) = given {
        return Ok(a);
    }
    let Some(api) = api else {
        bail!("name the controller with --controller HOST:15014")
    };
    pods_named(api, ns, CONTROLLER)
        .await?
        .iter()
        .find_map(pod_ip)
        .map(|ip| SocketAddr::new(ip, CONTROLLER_METRICS_PORT))
        .with_context(|| format!("no controller pod with an IP in namespace {ns}"))
}

pub fn proxy_status(controller: SocketAddr, format: Format) -> Result<()> {
    let s = streams(controller)?;
    let mut rows = vec![vec![
        "NODE".into(),
        "ROLE".into(),
        "SENT".into(),
        "ACKED".into(),
        "STATUS".into(),
    ]];
    for sub in &s.subscribers {
        let acked = sub["acked_version"].as_u64().unwrap_or(0);
        let nack = &sub["last_nack"];
        let status = if nack.is_object() && nack["version"].as_u64().unwrap_or(0) > acked {
            format!(
                "NACKED v{}: {}",
                nack["version"],
                nack["error"].as_str().unwrap_or("")
            )
        } else if acked == s.latest {
            "SYNCED".into()
        } else if sub["in_flight"] == true {
            "PUSHING".into()
        } else {
            format!("STALE (latest v{})", s.latest)
        };
        rows.push(vec![
            sub["node"].as_str().unwrap_or("").into(),
            sub["role"].as_str().unwrap_or("").into(),
            sub["sent_version"].to_string(),
            acked.to_string(),
            status,
        ]);
    }
    print(
        format,
        &json!({"latest_version": s.latest, "subscribers": s.subscribers}),
        rows,
    )
}

/// The model: offline from `manifests`, else from the controller.
pub fn model(manifests: Option<&Path>, controller: Option<SocketAddr>) -> Result<MeshModel> {
    if let Some(dir) = manifests {
        let out = weft_controller::manifests::load(dir, weft_api::identity::DEFAULT_TRUST_DOMAIN);
        for p in &out.problems {
            eprintln!("weftctl: {p}");
        }
        return Ok(out.model);
    }
    let Some(addr) = controller else {
        bail!("no controller to ask")
    };
    let v = http_get::get_json(addr, "/debug/model")?;
    serde_json::from_value(v).context("the controller's model does not decode")
}

pub fn workloads(m: &MeshModel, format: Format) -> Result<()> {
    let mut rows = vec![vec![
        "NAMESPACE".into(),
        "NAME".into(),
        "NODE".into(),
        "IPS".into(),
        "IDENTITY".into(),
        "CAPTURED".into(),
    ]];
    for w in &m.workloads {
        rows.push(vec![
            w.namespace.clone(),
            w.name.clone(),
            w.node.clone(),
            w.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            m.identity_of(w).to_string(),
            m.is_captured(w).to_string(),
        ]);
    }
    print(format, &serde_json::to_value(&m.workloads)?, rows)
}

pub fn services(m: &MeshModel, format: Format) -> Result<()> {
    let mut rows = vec![vec![
        "NAMESPACE".into(),
        "NAME".into(),
        "VIPS".into(),
        "PORTS".into(),
        "WAYPOINT".into(),
    ]];
    for s in &m.services {
        rows.push(vec![
            s.namespace.clone(),
            s.name.clone(),
            s.vips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            s.ports
                .iter()
                .map(|p| format!("{}->{}", p.port, p.target()))
                .collect::<Vec<_>>()
                .join(","),
            s.waypoint.clone().unwrap_or_default(),
        ]);
    }
    print(format, &serde_json::to_value(&m.services)?, rows)
}

pub fn policies(m: &MeshModel, format: Format) -> Result<()> {
    let mut rows = vec![vec![
        "NAMESPACE".into(),
        "NAME".into(),
        "KIND".into(),
        "ACTION".into(),
        "ENFORCED BY".into(),
        "RULES".into(),
    ]];
    for p in &m.policies {
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            "AuthorizationPolicy".into(),
            format!("{:?}", p.action).to_uppercase(),
            if p.targets.is_empty() {
                "ztunnel".into()
            } else {
                "waypoint".into()
            },
            p.rules.len().to_string(),
        ]);
    }
    for p in &m.peer_authentications {
        rows.push(vec![
            p.namespace.clone(),
            p.name.clone(),
            "PeerAuthentication".into(),
            format!("{:?}", p.mode).to_uppercase(),
            "ztunnel".into(),
            "-".into(),
        ]);
    }
    print(
        format,
        &json!({"authorization_policies": m.policies, "peer_authentications": m.peer_authentications}),
        rows,
    )
}

/// Every node's ztunnel report, by node.
async fn node_reports(api: &Api, ns: &str) -> Result<Vec<(String, Result<NodeReport>)>> {
    let mut out = Vec::new();
    for z in pods_named(api, ns, ZTUNNEL).await? {
        let node = z["spec"]["nodeName"]
            .as_str()
            .unwrap_or(name(&z))
            .to_owned();
        let r = match pod_ip(&z) {
            Some(ip) => http_get::get_json(SocketAddr::new(ip, ports::METRICS), "/debug/node")
                .and_then(|v| Ok(serde_json::from_value(v)?)),
            None => Err(anyhow::anyhow!("pod {} has no IP", name(&z))),
        };
        out.push((node, r));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

pub async fn certs(api: &Api, ns: &str, format: Format) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rows = vec![vec![
        "NODE".into(),
        "IDENTITY".into(),
        "EXPIRES IN".into(),
        "LAST ERROR".into(),
    ]];
    let mut data = serde_json::Map::new();
    for (node, r) in node_reports(api, ns).await? {
        match r {
            Ok(r) => {
                for c in &r.certificates {
                    rows.push(vec![
                        node.clone(),
                        c.identity.clone(),
                        if c.expires_unix <= now {
                            "EXPIRED".into()
                        } else {
                            human(c.expires_unix - now)
                        },
                        c.last_error.clone().unwrap_or_default(),
                    ]);
                }
                data.insert(node, serde_json::to_value(&r.certificates)?);
            }
            Err(e) => {
                rows.push(vec![node.clone(), "-".into(), "-".into(), format!("{e:#}")]);
                data.insert(node, json!({"error": format!("{e:#}")}));
            }
        }
    }
    print(format, &Value::Object(data), rows)
}

/// A node's ztunnel: its `/debug/node` report, or with `admin` (the admin
/// port is localhost-only: run on the node or through a port-forward) the
/// whole `/config_dump`.
pub async fn ztunnel_config(
    api: Option<&Api>,
    ns: &str,
    node: &str,
    admin: Option<SocketAddr>,
    format: Format,
) -> Result<()> {
    let v = match (admin, api) {
        (Some(a), _) => http_get::get_json(a, "/config_dump")?,
        (None, Some(api)) => {
            let reports = node_reports(api, ns).await?;
            let Some((_, r)) = reports.into_iter().find(|(n, _)| n == node) else {
                bail!("no ztunnel pod on node {node}")
            };
            serde_json::to_value(r?)?
        }
        (None, None) => bail!("needs the Kubernetes API or --admin"),
    };
    match format {
        Format::Yaml => print!("{}", serde_yaml::to_string(&v)?),
        _ => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}
