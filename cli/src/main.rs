//! weftctl: Weft's command-line tool. `check` (grouped health checks of a
//! cluster before install with `--pre`, or of the installed mesh),
//! inspection of what the controller and the proxies hold (`proxy-status`,
//! `workloads`, `services`, `policies`, `certs`, `ztunnel config`), and
//! `status` of the ztunnel on this node (its localhost admin port).

mod check;
mod explain;
mod http_get;
mod inspect;
mod kube_api;
mod waypoint;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use inspect::Format;

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Check and inspect a Weft mesh")]
struct Cli {
    /// Kubeconfig to use (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long, global = true, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace Weft is installed in.
    #[arg(
        long,
        global = true,
        env = "WEFT_NAMESPACE",
        default_value = "weft-system"
    )]
    weft_namespace: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum CheckFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Health checks: exit 0 when all pass, 1 on an error, 2 on warnings
    /// only with --strict.
    Check {
        /// Before install: permissions, versions, other meshes, policies.
        #[arg(long)]
        pre: bool,
        /// Also check this machine's kernel, cgroup v2 and bpffs (on a node).
        #[arg(long)]
        local: bool,
        /// Where --local expects the bpffs.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpf_dir: PathBuf,
        /// With --pre --local: only this machine, no Kubernetes API.
        #[arg(long)]
        no_kube: bool,
        /// Exit 2 when there are warnings but no errors.
        #[arg(long)]
        strict: bool,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: CheckFormat,
    },
    /// Every config stream: versions sent and acknowledged, NACKs.
    ProxyStatus {
        /// The controller's metrics address (default: found through the API).
        #[arg(long)]
        controller: Option<SocketAddr>,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Workloads of the mesh model.
    Workloads(ModelArgs),
    /// Services of the mesh model.
    Services(ModelArgs),
    /// AuthorizationPolicies and PeerAuthentications of the mesh model.
    Policies(ModelArgs),
    /// Policy decisions.
    Policy {
        #[command(subcommand)]
        what: PolicyCmd,
    },
    /// Workload certificates held by each node's ztunnel.
    Certs {
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Waypoints: the Gateway of class weft-waypoint, who uses it, its status.
    Waypoint {
        #[command(subcommand)]
        what: WaypointCmd,
    },
    /// A node's ztunnel.
    Ztunnel {
        #[command(subcommand)]
        what: ZtunnelCmd,
    },
    /// Health and state of the ztunnel on this node (its admin port).
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:15021")]
        readiness: SocketAddr,
        /// Print the raw config dump as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Offline: build the model from this folder of manifests.
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// The controller's metrics address (default: found through the API).
    #[arg(long)]
    controller: Option<SocketAddr>,
    #[arg(long, short = 'o', value_enum, default_value = "table")]
    output: Format,
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Which policy and rule allow or deny SRC (namespace/name or IP) to
    /// DST (a Service as namespace/name, a workload as pod/namespace/name,
    /// or an IP) on PORT, at each hop, by the proxies' own evaluation.
    Explain {
        src: String,
        dst: String,
        port: u16,
        /// An HTTP request's method (for waypoint policy); without it the
        /// connection is judged at L4.
        #[arg(long)]
        method: Option<String>,
        #[arg(long)]
        path: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
    },
}

#[derive(Subcommand)]
enum WaypointCmd {
    /// Creates or updates waypoint NAME (the controller deploys it).
    Apply {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Replicas of its Deployment.
        #[arg(long)]
        replicas: Option<u32>,
        /// Send every Service of the namespace through it.
        #[arg(long)]
        enroll_namespace: bool,
        /// Send this Service through it (repeatable).
        #[arg(long = "for-service")]
        services: Vec<String>,
        /// Print the Gateway instead of applying it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Waypoints of a namespace (or of all with --all-namespaces).
    List {
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, short = 'A')]
        all_namespaces: bool,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Conditions of waypoint NAME and what uses it.
    Status {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        #[arg(long, short = 'o', value_enum, default_value = "table")]
        output: Format,
    },
    /// Deletes waypoint NAME.
    Delete {
        name: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
    },
}

#[derive(Subcommand)]
enum ZtunnelCmd {
    /// The node's report (kernel, hooks, certificates), or with --admin
    /// the full config dump.
    Config {
        node: String,
        /// The ztunnel's admin address (localhost on the node, or a
        /// port-forward).
        #[arg(long)]
        admin: Option<SocketAddr>,
        #[arg(long, short = 'o', value_enum, default_value = "json")]
        output: Format,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weftctl: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn api(cli: &Cli) -> Result<kube_api::Api> {
    Ok(kube_api::Api {
        client: kube_api::client(cli.kubeconfig.as_deref()).await?,
    })
}

/// The model offline from `--manifests`, else the controller's.
async fn load_model(cli: &Cli, ns: &str, a: &ModelArgs) -> Result<weft_api::MeshModel> {
    if a.manifests.is_some() {
        return inspect::model(a.manifests.as_deref(), None);
    }
    let api = if a.controller.is_some() {
        None
    } else {
        Some(api(cli).await?)
    };
    let addr = inspect::controller_addr(api.as_ref(), ns, a.controller).await?;
    inspect::model(None, Some(addr))
}

async fn run(cli: Cli) -> Result<u8> {
    let ns = cli.weft_namespace.clone();
    match &cli.command {
        Cmd::Check {
            pre,
            local,
            bpf_dir,
            no_kube,
            strict,
            output,
        } => {
            let report = if *pre {
                let api = if *no_kube {
                    None
                } else {
                    Some(api(&cli).await?)
                };
                check::pre::run(api.as_ref(), local.then_some(bpf_dir.as_path()), &ns).await?
            } else {
                let mut r = check::cluster::run(&api(&cli).await?, &ns).await?;
                if *local {
                    r.add(
                        check::pre::run(None, Some(bpf_dir), &ns)
                            .await?
                            .groups
                            .remove(0),
                    );
                }
                r
            };
            match output {
                CheckFormat::Text => print!("{}", report.render()),
                CheckFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
            }
            Ok(report.exit_code(*strict))
        }
        Cmd::ProxyStatus { controller, output } => {
            let api = if controller.is_some() {
                None
            } else {
                Some(api(&cli).await?)
            };
            let addr = inspect::controller_addr(api.as_ref(), &ns, *controller).await?;
            inspect::proxy_status(addr, *output)?;
            Ok(0)
        }
        Cmd::Workloads(a) | Cmd::Services(a) | Cmd::Policies(a) => {
            let model = load_model(&cli, &ns, a).await?;
            match &cli.command {
                Cmd::Workloads(_) => inspect::workloads(&model, a.output)?,
                Cmd::Services(_) => inspect::services(&model, a.output)?,
                _ => inspect::policies(&model, a.output)?,
            }
            Ok(0)
        }
        Cmd::Policy {
            what:
                PolicyCmd::Explain {
                    src,
                    dst,
                    port,
                    method,
                    path,
                    model: a,
                },
        } => {
            let model = load_model(&cli, &ns, a).await?;
            let e = explain::explain(&model, src, dst, *port, method.as_deref(), path.as_deref())?;
            match a.output {
                Format::Table => print!("{}", explain::render(&e)),
                Format::Json => println!("{}", serde_json::to_string_pretty(&e)?),
                Format::Yaml => print!("{}", serde_yaml::to_string(&e)?),
            }
            Ok(if e.decision == "allow" { 0 } else { 1 })
        }
        Cmd::Waypoint { what } => {
            match what {
                WaypointCmd::Apply {
                    name,
                    namespace,
                    replicas,
                    enroll_namespace,
                    services,
                    dry_run,
                } => {
                    let api = if *dry_run {
                        None
                    } else {
                        Some(api(&cli).await?)
                    };
                    waypoint::apply(
                        api.as_ref(),
                        waypoint::Apply {
                            ns: namespace,
                            name,
                            replicas: *replicas,
                            enroll_namespace: *enroll_namespace,
                            services,
                            dry_run: *dry_run,
                        },
                    )
                    .await?
                }
                WaypointCmd::List {
                    namespace,
                    all_namespaces,
                    output,
                } => {
                    waypoint::list(
                        &api(&cli).await?,
                        (!*all_namespaces).then_some(namespace.as_str()),
                        *output,
                    )
                    .await?
                }
                WaypointCmd::Status {
                    name,
                    namespace,
                    output,
                } => waypoint::status(&api(&cli).await?, namespace, name, *output).await?,
                WaypointCmd::Delete { name, namespace } => {
                    waypoint::delete(&api(&cli).await?, namespace, name).await?
                }
            }
            Ok(0)
        }
        Cmd::Certs { output } => {
            inspect::certs(&api(&cli).await?, &ns, *output).await?;
            Ok(0)
        }
        Cmd::Ztunnel {
            what:
                ZtunnelCmd::Config {
                    node,
                    admin,
                    output,
                },
        } => {
            let api = if admin.is_some() {
                None
            } else {
                Some(api(&cli).await?)
            };
            inspect::ztunnel_config(api.as_ref(), &ns, node, *admin, *output).await?;
            Ok(0)
        }
        Cmd::Status {
            admin,
            readiness,
            json,
        } => {
            let (code, body) = http_get::get(*admin, "/config_dump")
                .context("cannot reach the ztunnel's admin port (is it running on this node?)")?;
            if code != 200 {
                bail!("/config_dump answered {code}");
            }
            let dump: Value = serde_json::from_str(&body).context("config dump is not JSON")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&dump)?);
            }
            let ready = http_get::get(*readiness, "/healthz/ready")
                .map(|(c, _)| c == 200)
                .unwrap_or(false);
            print!("{}", render(&dump, ready, SystemTime::now()));
            Ok(if ready { 0 } else { 3 })
        }
    }
}

fn render(dump: &Value, ready: bool, now: SystemTime) -> String {
    let mut out = String::new();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    out += &format!(
        "ztunnel on {}: {}, mesh model version {}\n",
        dump["node"].as_str().unwrap_or("?"),
        if ready { "READY" } else { "NOT READY" },
        dump["model_version"]
    );
    let pods = dump["pods"].as_array().cloned().unwrap_or_default();
    out += &format!("pods ({}):\n", pods.len());
    for p in &pods {
        out += &format!(
            "  {:<40} {:<10} {}\n",
            p["pod"].as_str().unwrap_or("?"),
            if p["enrolled"] == true {
                "captured"
            } else {
                "direct"
            },
            p["ips"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
    }
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    out += &format!("workload certificates ({}):\n", certs.len());
    for c in &certs {
        let exp = c["expires_unix"].as_u64().unwrap_or(0);
        let left = exp.saturating_sub(now);
        let state = if exp <= now {
            "EXPIRED".to_owned()
        } else {
            format!("expires in {}h{:02}m", left / 3600, left % 3600 / 60)
        };
        out += &format!(
            "  {:<60} {}\n",
            c["identity"].as_str().unwrap_or("?"),
            state
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn renders_pods_and_certificate_expiry() {
        let dump = serde_json::json!({
            "node": "node1", "model_version": 3,
            "pods": [{"pod": "shop/web", "enrolled": true, "ips": ["10.0.0.2"]}, {"pod": "legacy/job", "enrolled": false, "ips": []}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "expires_unix": 1000 + 7260}, {"identity": "spiffe://x/ns/a/sa/b", "expires_unix": 10}],
        });
        let text = render(&dump, true, UNIX_EPOCH + Duration::from_secs(1000));
        assert!(
            text.contains("node1: READY, mesh model version 3"),
            "{text}"
        );
        assert!(
            text.contains("shop/web") && text.contains("captured") && text.contains("10.0.0.2"),
            "{text}"
        );
        assert!(
            text.contains("legacy/job") && text.contains("direct"),
            "{text}"
        );
        assert!(text.contains("expires in 2h01m"), "{text}");
        assert!(text.contains("EXPIRED"), "{text}");
    }
}
