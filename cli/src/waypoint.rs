//! `weftctl waypoint apply|list|status|delete`: the Gateway of class
//! `weft-waypoint` a user would otherwise write by hand (the controller
//! then deploys the waypoint), which namespaces and Services use it, and
//! whether it is programmed.

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_api::l7::{USE_WAYPOINT_LABEL, WAYPOINT_CLASS};

use crate::inspect::{print, Format};
use crate::kube_api::{condition, name, namespace, Api, Found};

const GATEWAYS: &str = "/apis/gateway.networking.k8s.io/v1";
const FIELD_MANAGER: &str = "weftctl";

/// The Gateway for waypoint `name` in `ns`.
pub fn gateway(ns: &str, name: &str, replicas: Option<u32>) -> Value {
    let mut gw = json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "gatewayClassName": WAYPOINT_CLASS,
            "listeners": [{"name": "mesh", "port": weft_api::ports::HBONE, "protocol": "HBONE"}],
        },
    });
    if let Some(r) = replicas {
        gw["metadata"]["annotations"] = json!({"weft.dev/waypoint-replicas": r.to_string()});
    }
    gw
}

pub struct Apply<'a> {
    pub ns: &'a str,
    pub name: &'a str,
    pub replicas: Option<u32>,
    /// Label the namespace so all its Services use the waypoint.
    pub enroll_namespace: bool,
    /// Label these Services of the namespace instead.
    pub services: &'a [String],
    /// Print the Gateway, change nothing.
    pub dry_run: bool,
}

pub async fn apply(api: Option<&Api>, a: Apply<'_>) -> Result<()> {
    let gw = gateway(a.ns, a.name, a.replicas);
    if a.dry_run {
        print!("{}", serde_yaml::to_string(&gw)?);
        return Ok(());
    }
    let Some(api) = api else {
        bail!("needs the Kubernetes API")
    };
    api.apply(
        &format!(
            "{GATEWAYS}/namespaces/{}/gateways/{}?fieldManager={FIELD_MANAGER}&force=true",
            a.ns, a.name
        ),
        &gw,
    )
    .await
    .context("applying the Gateway (are the Gateway API CRDs installed? `weftctl check`)")?;
    println!("waypoint {}/{} applied", a.ns, a.name);
    let label = json!({"metadata": {"labels": {USE_WAYPOINT_LABEL: a.name}}});
    if a.enroll_namespace {
        api.merge_patch(&format!("/api/v1/namespaces/{}", a.ns), &label)
            .await?;
        println!("namespace {} uses waypoint {}", a.ns, a.name);
    }
    for s in a.services {
        api.merge_patch(&format!("/api/v1/namespaces/{}/services/{s}", a.ns), &label)
            .await?;
        println!("service {}/{s} uses waypoint {}", a.ns, a.name);
    }
    Ok(())
}

/// Waypoints of `ns` (every namespace when `None`).
async fn waypoints(api: &Api, ns: Option<&str>) -> Result<Vec<Value>> {
    let path = match ns {
        Some(ns) => format!("{GATEWAYS}/namespaces/{ns}/gateways"),
        None => format!("{GATEWAYS}/gateways"),
    };
    Ok(api
        .list(&path)
        .await?
        .into_iter()
        .filter(|g| g["spec"]["gatewayClassName"] == WAYPOINT_CLASS)
        .collect())
}

fn programmed(gw: &Value) -> String {
    match condition(gw, "Programmed") {
        Some(("True", _, _)) => "True".into(),
        Some((s, reason, _)) => format!("{s} ({reason})"),
        None => "Unknown".into(),
    }
}

/// Who uses waypoint `name` of `ns`: the namespace label and Service labels.
async fn users(api: &Api, ns: &str, name: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    if let Found::Object(n) = api.get(&format!("/api/v1/namespaces/{ns}")).await? {
        if n["metadata"]["labels"][USE_WAYPOINT_LABEL] == name {
            out.push(format!("namespace {ns}"));
        }
    }
    for s in api
        .list(&format!("/api/v1/namespaces/{ns}/services"))
        .await?
    {
        if s["metadata"]["labels"][USE_WAYPOINT_LABEL] == name {
            out.push(format!("service {ns}/{}", crate::kube_api::name(&s)));
        }
    }
    Ok(out)
}

pub async fn list(api: &Api, ns: Option<&str>, format: Format) -> Result<()> {
    let gws = waypoints(api, ns).await?;
    let mut rows = vec![vec!["NAMESPACE".into(), "NAME".into(), "PROGRAMMED".into()]];
    for g in &gws {
        rows.push(vec![namespace(g).into(), name(g).into(), programmed(g)]);
    }
    print(format, &Value::Array(gws), rows)
}

pub async fn status(api: &Api, ns: &str, name: &str, format: Format) -> Result<()> {
    let Found::Object(gw) = api
        .get(&format!("{GATEWAYS}/namespaces/{ns}/gateways/{name}"))
        .await?
    else {
        bail!("no waypoint {ns}/{name}");
    };
    let users = users(api, ns, name).await?;
    let conditions = gw["status"]["conditions"].clone();
    let data = json!({"namespace": ns, "name": name, "programmed": programmed(&gw), "conditions": conditions, "used_by": users});
    let mut rows = vec![vec!["FIELD".into(), "VALUE".into()]];
    rows.push(vec!["waypoint".into(), format!("{ns}/{name}")]);
    rows.push(vec!["programmed".into(), programmed(&gw)]);
    for c in conditions.as_array().into_iter().flatten() {
        rows.push(vec![
            format!("condition {}", c["type"].as_str().unwrap_or("")),
            format!(
                "{} {} {}",
                c["status"].as_str().unwrap_or(""),
                c["reason"].as_str().unwrap_or(""),
                c["message"].as_str().unwrap_or("")
            )
            .trim()
            .to_owned(),
        ]);
    }
    rows.push(vec![
        "used by".into(),
        if users.is_empty() {
            "nothing (label a namespace or Service weft.dev/use-waypoint)".into()
        } else {
            users.join(", ")
        },
    ]);
    print(format, &data, rows)
}

pub async fn delete(api: &Api, ns: &str, name: &str) -> Result<()> {
    match api
        .delete(&format!("{GATEWAYS}/namespaces/{ns}/gateways/{name}"))
        .await?
    {
        Found::Missing => bail!("no waypoint {ns}/{name}"),
        Found::Object(_) => {
            println!("waypoint {ns}/{name} deleted");
            let users = users(api, ns, name).await?;
            if !users.is_empty() {
                eprintln!("weftctl: still labelled to use it (their traffic is refused until relabelled): {}", users.join(", "));
            }
            Ok(())
        }
    }
}
