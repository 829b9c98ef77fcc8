//! End-to-end test support for Weft: a simulated cluster of network
//! namespaces, veths and cgroups (`cluster`), and the location of the
//! `weft-testapp` client/server program that runs inside simulated pods.

pub mod cluster;
pub mod conformance;
pub mod manifests;
pub mod mesh;
pub mod waypoint;
pub mod wire;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub use cluster::{
    invoke_cni, sweep_unlocked_slots, Capture, Cluster, CniError, Node, Packet, Pod,
};

const TESTAPP: &str = "weft-testapp";

/// Path of the `weft-testapp` binary: `$WEFT_TESTAPP`, else next to the
/// running executable (target/<profile>/ or its deps/ dir), else built with
/// `cargo build -p weft-e2e --bin weft-testapp` (cargo builds only the
/// binaries of the package under test, so other crates' tests land here).
pub fn testapp_path() -> PathBuf {
    match find_or_build_testapp() {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    }
}

fn find_or_build_testapp() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_TESTAPP") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the current executable")?;
    let candidates = |exe: &std::path::Path| -> Vec<PathBuf> {
        exe.ancestors()
            .skip(1)
            .take(2)
            .map(|d| d.join(TESTAPP))
            .collect()
    };
    if let Some(p) = candidates(&exe).into_iter().find(|p| p.is_file()) {
        return Ok(p);
    }
    let release = exe
        .ancestors()
        .any(|d| d.file_name().is_some_and(|n| n == "release"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["build", "-p", "weft-e2e", "--bin", TESTAPP]);
    if release {
        build.arg("--release");
    }
    let status = build
        .status()
        .with_context(|| format!("running {build:?}"))?;
    if !status.success() {
        bail!("{TESTAPP} not found next to {} and `{build:?}` failed; build it with `cargo build -p weft-e2e --bin {TESTAPP}` or set WEFT_TESTAPP", exe.display());
    }
    match candidates(&exe).into_iter().find(|p| p.is_file()) {
        Some(p) => Ok(p),
        None => bail!(
            "built {TESTAPP} but it is not next to {}; set WEFT_TESTAPP to its path",
            exe.display()
        ),
    }
}
