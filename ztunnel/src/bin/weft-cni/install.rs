//! The installer the ztunnel DaemonSet runs (a native sidecar, plus the
//! preflight init container), with the host's CNI directories mounted:
//!
//! - `preflight`: the host mounts the ztunnel relies on are really there;
//! - `install`: copy this binary into the CNI bin dir, write the plugin's
//!   kubeconfig, chain the plugin last in the primary conflist, and put all
//!   of it back whenever it disappears (a primary CNI may rewrite its
//!   conflist at will); `--once` for one pass;
//! - `remove`: take the entry out of every conflist and delete the binary
//!   and the kubeconfig (`ztunnel.uninstall=true`); `--wait` then idles.
//!
//! The primary conflist is the one the container runtime loads: the first
//! `*.conf`, `*.conflist` or `*.json` in the conf dir by name (or
//! `WEFT_CNI_CONF_NAME`). It is rewritten (atomically) only when it changes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;

use crate::conflist::{self, EditError, Mode};

/// Folder (inside the CNI conf dir) of the plugin's kubeconfig, token and
/// CA; runtimes load only files of the conf dir, not folders.
const KUBECONFIG_DIR: &str = "weft.d";

fn log(msg: impl std::fmt::Display) {
    eprintln!("weft-cni install: {msg}");
}

#[derive(clap::Args)]
pub struct Preflight {
    /// Where the host's bpffs must be mounted.
    #[arg(long, env = "WEFT_BPFFS", default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    /// The host's cgroup v2 root as mounted in this container.
    #[arg(long, env = "WEFT_CGROUP_ROOT", default_value = "/host/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    #[arg(long, env = "WEFT_MOUNTINFO", default_value = "/proc/self/mountinfo")]
    mountinfo: PathBuf,
}

#[derive(clap::Args)]
pub struct Dirs {
    /// The host's CNI bin dir, as mounted here.
    #[arg(long, env = "WEFT_CNI_BIN_DIR", default_value = "/host/opt/cni/bin")]
    bin_dir: PathBuf,
    /// The host's CNI conf dir, as mounted here.
    #[arg(long, env = "WEFT_CNI_CONF_DIR", default_value = "/host/etc/cni/net.d")]
    conf_dir: PathBuf,
}

#[derive(clap::Args)]
pub struct Install {
    #[command(flatten)]
    dirs: Dirs,
    /// One pass, then exit.
    #[arg(long)]
    once: bool,
    /// The binary to install (default: this one).
    #[arg(long, env = "WEFT_CNI_BIN_SRC")]
    bin_src: Option<PathBuf>,
    /// Conflist to chain into; empty: the first one by name.
    #[arg(long, env = "WEFT_CNI_CONF_NAME", default_value = "")]
    conf_name: String,
    /// The same conf dir as the host (and so the plugin) sees it: the
    /// kubeconfig's paths are written for the plugin.
    #[arg(long, env = "WEFT_CNI_HOST_CONF_DIR", default_value = "/etc/cni/net.d")]
    host_conf_dir: PathBuf,
    /// Host path of the ztunnel's CNI socket.
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = weft_api::cni::DEFAULT_SOCKET)]
    socket: String,
    /// Host path of the ztunnel's state dir (where the plugin leaves pod
    /// records while the ztunnel is away).
    #[arg(long, env = "WEFT_CNI_STATE_DIR", default_value = weft_api::cni::DEFAULT_STATE_DIR)]
    state_dir: String,
    /// Namespaces whose pods are never enrolled nor held up, comma-separated.
    #[arg(
        long,
        env = "WEFT_CNI_EXCLUDE_NAMESPACES",
        value_delimiter = ',',
        default_value = "kube-system"
    )]
    exclude_namespaces: Vec<String>,
    /// Token the plugin presents to the Kubernetes API (a ServiceAccount
    /// token with `get` on namespaces and pods). Without it the plugin has
    /// no kubeconfig and leaves every decision to the ztunnel.
    #[arg(long, env = "WEFT_CNI_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The API server's CA certificate.
    #[arg(long, env = "WEFT_CNI_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The API server's URL as reachable from the node; default
    /// `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    #[arg(long, env = "WEFT_CNI_KUBERNETES_API")]
    kubernetes_api: Option<String>,
    /// Seconds between checks that everything is still in place.
    #[arg(long, env = "WEFT_CNI_RECONCILE_SECONDS", default_value_t = 10)]
    reconcile_seconds: u64,
}

#[derive(clap::Args)]
pub struct Remove {
    #[command(flatten)]
    dirs: Dirs,
    /// After removing, idle until SIGTERM (the DaemonSet's clean-up mode).
    #[arg(long)]
    wait: bool,
}

pub fn preflight(p: &Preflight) -> Result<()> {
    let mounts = std::fs::read_to_string(&p.mountinfo)
        .with_context(|| format!("reading {}", p.mountinfo.display()))?;
    // Pins must land on the host's bpffs: one mounted only inside this
    // container would vanish with it, and the capture programs with it.
    if !mounted(&mounts, &p.bpffs, "bpf") {
        bail!(
            "{} is not a bpf filesystem on this node: mount one on the host (mount -t bpf bpf /sys/fs/bpf, or systemd's sys-fs-bpf.mount) so Weft's pinned programs outlive the ztunnel pod",
            p.bpffs.display()
        );
    }
    if !mounted(&mounts, &p.cgroup_root, "cgroup2")
        && !mounted(&mounts, &p.cgroup_root.join("unified"), "cgroup2")
    {
        bail!(
            "no cgroup v2 hierarchy at {0} or {0}/unified: Weft attaches its connect programs to the node's cgroup v2 root",
            p.cgroup_root.display()
        );
    }
    log(format_args!(
        "preflight ok: bpffs at {}, cgroup v2 under {}",
        p.bpffs.display(),
        p.cgroup_root.display()
    ));
    Ok(())
}

/// Whether `path` is a mount point of `fstype` in a mountinfo text.
fn mounted(mountinfo: &str, path: &Path, fstype: &str) -> bool {
    mountinfo.lines().any(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-");
        fields.get(4).map(Path::new) == Some(path)
            && sep.and_then(|s| fields.get(s + 1)) == Some(&fstype)
    })
}

pub fn install(i: &Install) -> Result<()> {
    let src = match &i.bin_src {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating this binary")?,
    };
    let entry = entry(i)?;
    install_binary(&src, &i.dirs.bin_dir)?;
    if i.once {
        return install_once(i, &src, &entry);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        loop {
            install_once(i, &src, &entry)?;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(i.reconcile_seconds.max(1))) => {}
                signal = weft_dataplane::logging::shutdown_signal() => {
                    log(format_args!(
                        "{}: stopping; the chained entry stays (pods wait for the next ztunnel rather than start uncaptured)",
                        signal?
                    ));
                    return Ok(());
                }
            }
        }
    })
}

/// The plugin's entry in the chain, one line of JSON.
fn entry(i: &Install) -> Result<String> {
    for ns in &i.exclude_namespaces {
        weft_api::cni::check_namespace(ns)?;
    }
    let mut fields = vec![
        ("type", json!("weft-cni")),
        ("ztunnel_socket", json!(i.socket)),
        ("state_dir", json!(i.state_dir)),
        ("exclude_namespaces", json!(i.exclude_namespaces)),
    ];
    if i.token_file.is_some() {
        let kubeconfig = i.host_conf_dir.join(KUBECONFIG_DIR).join("kubeconfig");
        fields.push(("kubeconfig", json!(kubeconfig)));
    }
    let body: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{v}", json!(k)))
        .collect();
    Ok(format!("{{{}}}", body.join(",")))
}

fn install_binary(src: &Path, bin_dir: &Path) -> Result<()> {
    if !src.is_file() {
        bail!("{} is missing from the image", src.display());
    }
    let bytes = std::fs::read(src).with_context(|| format!("reading {}", src.display()))?;
    let dest = bin_dir.join("weft-cni");
    weft_pki::files::write_atomic(&dest, &bytes, 0o755)
        .with_context(|| format!("installing {}", dest.display()))?;
    log(format_args!("installed {}", dest.display()));
    Ok(())
}

fn install_once(i: &Install, src: &Path, entry: &str) -> Result<()> {
    if !i.dirs.bin_dir.join("weft-cni").is_file() {
        install_binary(src, &i.dirs.bin_dir)?;
    }
    if i.token_file.is_some() {
        write_kubeconfig(i)?;
    }
    let Some(conf) = primary_conf(&i.dirs.conf_dir, &i.conf_name)? else {
        log(format_args!(
            "no CNI config in {} yet; waiting for the primary CNI",
            i.dirs.conf_dir.display()
        ));
        return Ok(());
    };
    edit_conf(&conf, Mode::Install(entry))
}

/// `weft.d/{token,ca.crt,kubeconfig}`, rewritten only when they change
/// (the token Secret can be re-issued).
fn write_kubeconfig(i: &Install) -> Result<()> {
    let (Some(token_file), Some(ca_file)) = (&i.token_file, &i.ca_file) else {
        bail!("a token file needs the API server's CA too (WEFT_CNI_CA_FILE)");
    };
    let server = match &i.kubernetes_api {
        Some(s) => s.clone(),
        None => {
            let host = std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| {
                anyhow!("KUBERNETES_SERVICE_HOST is not set: give WEFT_CNI_KUBERNETES_API")
            })?;
            let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
            if host.contains(':') {
                format!("https://[{host}]:{port}")
            } else {
                format!("https://{host}:{port}")
            }
        }
    };
    let dir = i.dirs.conf_dir.join(KUBECONFIG_DIR);
    let host_dir = i.host_conf_dir.join(KUBECONFIG_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // The token controller fills the Secret shortly after it is created;
    // until then the plugin asks the ztunnel alone (its kubeconfig does
    // not load), and the next pass writes it.
    let token = match std::fs::read(token_file) {
        Ok(t) if !t.trim_ascii().is_empty() => t,
        _ => {
            log(format_args!(
                "no token in {} yet; the plugin reads no API until it is there",
                token_file.display()
            ));
            return Ok(());
        }
    };
    let ca = std::fs::read(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let kubeconfig = format!(
        "# Written by weft-cni install: lets the weft-cni plugin read pods and namespaces.\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - name: weft\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n\
         - name: weft-cni\n  user:\n    tokenFile: {token}\n\
         contexts:\n\
         - name: weft\n  context:\n    cluster: weft\n    user: weft-cni\n\
         current-context: weft\n",
        server = json!(server),
        ca = json!(host_dir.join("ca.crt")),
        token = json!(host_dir.join("token")),
    );
    for (name, bytes) in [
        ("token", token.as_slice()),
        ("ca.crt", ca.as_slice()),
        ("kubeconfig", kubeconfig.as_bytes()),
    ] {
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() != Some(bytes) {
            weft_pki::files::write_atomic(&path, bytes, 0o600)
                .with_context(|| format!("writing {}", path.display()))?;
            log(format_args!("wrote {}", path.display()));
        }
    }
    Ok(())
}

fn is_config(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e, "conf" | "conflist" | "json"))
}

/// Every network configuration file of the conf dir, by name.
fn configs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_config(p))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    files.sort();
    Ok(files)
}

/// The conflist the runtime uses, or none while the primary CNI has not
/// written one yet.
fn primary_conf(dir: &Path, name: &str) -> Result<Option<PathBuf>> {
    if !name.is_empty() {
        let p = dir.join(name);
        return Ok(p.is_file().then_some(p));
    }
    Ok(configs(dir)?.into_iter().next())
}

fn edit_conf(path: &Path, mode: Mode<'_>) -> Result<()> {
    let removing = matches!(mode, Mode::Remove);
    let old =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let new = match conflist::rewrite(&old, mode) {
        Ok(n) => n,
        Err(EditError::NoPlugins | EditError::NothingToChainAfter) if removing => return Ok(()),
        Err(EditError::NoPlugins) => bail!(
            "{} has no \"plugins\" list: weft-cni is a chained plugin and needs a .conflist (convert the primary CNI's config, or set cni.confName to its conflist)",
            path.display()
        ),
        Err(EditError::NothingToChainAfter) => {
            bail!("{} has no plugin to chain weft-cni after", path.display())
        }
        Err(e) => bail!("cannot parse {}: {e}", path.display()),
    };
    if new.trim_end_matches('\n') == old.trim_end_matches('\n') {
        return Ok(());
    }
    let mode = std::fs::metadata(path)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777)
        .unwrap_or(0o644);
    weft_pki::files::write_atomic(path, new.as_bytes(), mode)
        .with_context(|| format!("writing {}", path.display()))?;
    log(format_args!(
        "{}: updated {}",
        if removing { "remove" } else { "install" },
        path.display()
    ));
    Ok(())
}

pub fn remove(r: &Remove) -> Result<()> {
    for conf in configs(&r.dirs.conf_dir)? {
        edit_conf(&conf, Mode::Remove)?;
    }
    let bin = r.dirs.bin_dir.join("weft-cni");
    weft_pki::files::remove_if_exists(&bin)?;
    let kc = r.dirs.conf_dir.join(KUBECONFIG_DIR);
    if kc.exists() {
        std::fs::remove_dir_all(&kc).with_context(|| format!("removing {}", kc.display()))?;
    }
    log(format_args!(
        "removed weft-cni from {} and {}",
        r.dirs.conf_dir.display(),
        r.dirs.bin_dir.display()
    ));
    if r.wait {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(weft_dataplane::logging::shutdown_signal())?;
    }
    Ok(())
}
