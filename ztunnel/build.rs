//! Builds Weft's eBPF object (`ebpf/programs`) with the nightly toolchain and
//! `bpf-linker`, and leaves it at `$OUT_DIR/weft-ebpf` for `include_bytes!`.
//! `WEFT_EBPF_OBJECT=<path>` uses a prebuilt object instead.

use std::env;
use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{exit, Command};

const SETUP_HINT: &str = "run 'cargo xtask setup' (it installs nightly rust-src and bpf-linker built against nightly's LLVM)";

fn fail(msg: &str) -> ! {
    eprintln!("weft: {msg}");
    println!("cargo:warning=weft: {msg}");
    exit(1);
}

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let ebpf_dir = manifest_dir.join("../ebpf");
    let dest = out_dir.join("weft-ebpf");

    println!("cargo:rerun-if-env-changed=WEFT_EBPF_OBJECT");
    if let Some(prebuilt) = env::var_os("WEFT_EBPF_OBJECT") {
        println!("cargo:rerun-if-changed={}", Path::new(&prebuilt).display());
        if let Err(e) = fs::copy(&prebuilt, &dest) {
            fail(&format!(
                "WEFT_EBPF_OBJECT={}: {e}",
                Path::new(&prebuilt).display()
            ));
        }
        return;
    }
    for p in [
        "Cargo.toml",
        "Cargo.lock",
        "common/Cargo.toml",
        "common/src",
        "programs/Cargo.toml",
        "programs/src",
    ] {
        println!("cargo:rerun-if-changed={}", ebpf_dir.join(p).display());
    }

    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")));
    let linker_on_path = env::var_os("PATH")
        .map(|p| env::split_paths(&p).any(|d| d.join("bpf-linker").is_file()))
        .unwrap_or(false);
    let linker_in_home = cargo_home
        .as_ref()
        .is_some_and(|h| h.join("bin/bpf-linker").is_file());
    if !linker_on_path && !linker_in_home {
        fail(&format!("bpf-linker not found: {SETUP_HINT}"));
    }
    if !nightly_has_rust_src() {
        fail(&format!(
            "bpf-linker not found: {SETUP_HINT} (nightly toolchain or its rust-src component is missing)"
        ));
    }
    let sysroot = match rustup(&["run", "nightly", "rustc", "--print", "sysroot"]) {
        Some(s) => PathBuf::from(s.trim()),
        None => fail(&format!(
            "bpf-linker not found: {SETUP_HINT} (no nightly toolchain)"
        )),
    };

    // The child build must not see the parent's compiler, flags or target
    // settings: drop every variable cargo sets for build scripts.
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "build"])
        .args([
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--release",
        ])
        .arg("--target-dir")
        .arg(out_dir.join("ebpf-target"))
        .current_dir(ebpf_dir.join("programs"));
    for (key, _) in env::vars_os() {
        let k = key.to_string_lossy();
        let inherited_build_setting = (k.starts_with("CARGO") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k.starts_with("RUSTDOC")
            || k.starts_with("RUSTFLAGS")
            || k == "RUSTUP_TOOLCHAIN"
            || k.starts_with("DEP_")
            || k == "LD_LIBRARY_PATH"
            || matches!(
                &*k,
                "TARGET" | "HOST" | "OUT_DIR" | "OPT_LEVEL" | "PROFILE" | "DEBUG" | "NUM_JOBS"
            );
        if inherited_build_setting {
            cmd.env_remove(&key);
        }
    }
    // bpf-linker is linked against the nightly toolchain's libLLVM.
    let mut ld = OsString::from(sysroot.join("lib"));
    if let Some(home) = &cargo_home {
        let bin = home.join("bin");
        let mut path = OsString::from(bin);
        if let Some(old) = env::var_os("PATH") {
            path.push(":");
            path.push(old);
        }
        cmd.env("PATH", path);
    }
    if let Some(old) = env::var_os("LD_LIBRARY_PATH") {
        // Keep only entries that are not another toolchain's lib dir.
        for p in env::split_paths(&old)
            .filter(|p| !p.starts_with(sysroot.parent().unwrap_or(Path::new("/nonexistent"))))
        {
            ld.push(":");
            ld.push(p);
        }
    }
    cmd.env("LD_LIBRARY_PATH", ld);

    let status = match cmd.status() {
        Ok(s) => s,
        Err(e) => fail(&format!(
            "cannot run 'rustup run nightly cargo': {e}: {SETUP_HINT}"
        )),
    };
    if !status.success() {
        fail(&format!(
            "building ebpf/programs failed ({status}); see the output above. If it is a linker error: {SETUP_HINT}"
        ));
    }
    let built = out_dir.join("ebpf-target/bpfel-unknown-none/release/weft-ebpf");
    if let Err(e) = fs::copy(&built, &dest) {
        fail(&format!(
            "copying {} to {}: {e}",
            built.display(),
            dest.display()
        ));
    }
}

fn rustup(args: &[&str]) -> Option<String> {
    let out = Command::new("rustup")
        .args(args)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_has_rust_src() -> bool {
    rustup(&["component", "list", "--toolchain", "nightly", "--installed"])
        .is_some_and(|s| s.lines().any(|l| l.trim().starts_with("rust-src")))
}
