//! `cargo xtask`: set-up, test and demo for Weft. Every command installs
//! what it needs first, idempotently, so a fresh machine needs nothing else.

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
    /// Data-path benchmark: no mesh vs Weft L4 cross-node and same-node
    /// (iperf3, wrk), with ztunnel CPU and memory; writes bench-results/.
    Bench {
        /// One run of 3 s per workload (under 2 minutes) instead of 3 of 10 s.
        #[arg(long)]
        quick: bool,
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
];

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Setup => setup(),
        Cmd::Test { args } => setup().and_then(|_| test(&args)),
        Cmd::Demo => setup().and_then(|_| demo()),
        Cmd::Bench { quick } => setup().and_then(|_| bench(quick)),
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
    install_bpf_linker()?;
    if !have("cargo-nextest") {
        run(Command::new("cargo").args(["install", "cargo-nextest", "--locked"]))?;
    }
    mount_bpffs()?;
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

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root_dir());
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
    // End-to-end tests start these binaries.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo()
        .args(["nextest", "run", "--workspace", "--no-fail-fast"])
        .args(args))
}

fn demo() -> Result<()> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(&mut Command::new(root_dir().join("target/debug/weft-demo")))
}

fn bench(quick: bool) -> Result<()> {
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let mut cmd = Command::new(root_dir().join("target/release/weft-bench"));
    cmd.current_dir(root_dir())
        .arg("--out")
        .arg(root_dir().join("bench-results"));
    if quick {
        cmd.arg("--quick");
    }
    run(&mut cmd)
}
