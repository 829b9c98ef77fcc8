//! `cargo xtask image`: the OCI images of Weft's three components, built
//! without a container daemon. Each is one layer: static (musl) binaries in
//! `/usr/local/bin`, with `/etc/passwd`, `/etc/group` and `/tmp` and nothing
//! else (no shell, no libc, no iproute2). The OCI image layout (layer
//! tarball, config, manifest, index, `oci-layout`) is written here directly:
//! a single-layer image of our own files needs no build tool, the result is
//! byte-for-byte reproducible (sorted entries, fixed owners and times), and
//! no daemon or extra package is involved. `skopeo` and `umoci`, which read
//! what we write with their own parsers, are used by the image test to
//! check it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// The Rust target of the images' binaries: fully static.
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// The registry (and path) the chart pulls from by default
/// (`image.registry` in `charts/weft/values.yaml`).
pub const REGISTRY: &str = "ghcr.io/weft-mesh";
/// The workspace version: every image's tag (and the chart's appVersion).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One image: its name (the repository under [`REGISTRY`] and the folder of
/// its OCI layout), its binaries (the first is the entrypoint), and the user
/// it runs as.
pub struct ImageSpec {
    pub name: &'static str,
    pub binaries: &'static [&'static str],
    pub user: &'static str,
}

/// The controller and waypoint run as an unprivileged user; the ztunnel
/// needs root's capabilities (eBPF, setns into pods' namespaces).
pub const IMAGES: &[ImageSpec] = &[
    ImageSpec {
        name: "weft-controller",
        binaries: &["weft-controller", "weftctl"],
        user: "65532:65532",
    },
    ImageSpec {
        name: "weft-ztunnel",
        binaries: &["weft-ztunnel", "weft-cni"],
        user: "0:0",
    },
    ImageSpec {
        name: "weft-waypoint",
        binaries: &["weft-waypoint"],
        user: "65532:65532",
    },
];

/// Packages whose binaries go into the images.
const PACKAGES: &[&str] = &[
    "weft-controller",
    "weft-ztunnel",
    "weft-waypoint",
    "weftctl",
];

const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Every timestamp in the images (reproducible builds).
const EPOCH: &str = "1970-01-01T00:00:00Z";

/// An image written to disk.
pub struct Built {
    pub name: &'static str,
    pub layout: PathBuf,
    /// Compressed bytes of the layer (what a pull downloads).
    pub layer_bytes: u64,
    /// Uncompressed size of the root filesystem.
    pub rootfs_bytes: u64,
}

/// The folder holding one OCI layout per image.
pub fn out_dir(target_dir: &Path) -> PathBuf {
    target_dir.join("oci")
}

/// Builds the binaries for [`TARGET`] and writes every image's layout to
/// `<target>/oci/<name>/`.
pub fn build(mut cargo: Command, target_dir: &Path, release: bool) -> Result<Vec<Built>> {
    cargo.args(["build", "--target", TARGET, "--bins"]);
    for p in PACKAGES {
        cargo.args(["-p", p]);
    }
    if release {
        cargo.arg("--release");
    }
    // ring and mimalloc compile C for the target: Debian's musl-gcc. No
    // incremental state: these binaries are only ever built here, and it
    // would double their size on disk.
    cargo
        .env("CC_x86_64_unknown_linux_musl", "musl-gcc")
        .env("CARGO_INCREMENTAL", "0");
    crate::run(&mut cargo).context(
        "building the images' static binaries (needs `rustup target add x86_64-unknown-linux-musl` and musl-tools; `cargo xtask setup` installs both)",
    )?;
    let bin_dir = target_dir
        .join(TARGET)
        .join(if release { "release" } else { "debug" });
    let out = out_dir(target_dir);
    let mut built = Vec::new();
    for spec in IMAGES {
        let b = write_image(spec, &bin_dir, &out.join(spec.name), release)
            .with_context(|| format!("writing the {} image", spec.name))?;
        built.push(b);
    }
    eprintln!(
        "xtask: images ({} binaries):",
        if release { "release" } else { "debug" }
    );
    for b in &built {
        eprintln!(
            "xtask:   {REGISTRY}/{}:{VERSION}  layer {:.1} MiB compressed, {:.1} MiB unpacked  ({})",
            b.name,
            b.layer_bytes as f64 / 1048576.0,
            b.rootfs_bytes as f64 / 1048576.0,
            b.layout.display()
        );
    }
    eprintln!(
        "xtask: push with: skopeo copy oci:{}/<name>:{VERSION} docker://<registry>/<name>:{VERSION}",
        out.display()
    );
    Ok(built)
}

/// Writes `spec`'s OCI image layout to `dir` (replacing what was there).
fn write_image(spec: &ImageSpec, bin_dir: &Path, dir: &Path, release: bool) -> Result<Built> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;

    let (tar, rootfs_bytes) = rootfs_tar(spec, bin_dir)?;
    let diff_id = sha256(&tar);
    let level = if release {
        flate2::Compression::best()
    } else {
        flate2::Compression::fast()
    };
    // The gzip header carries no name and a zero time: reproducible.
    let mut gz = flate2::GzBuilder::new().mtime(0).write(Vec::new(), level);
    gz.write_all(&tar)?;
    let layer = gz.finish()?;
    let layer_desc = put_blob(&blobs, LAYER, &layer)?;

    let entrypoint = format!("/usr/local/bin/{}", spec.binaries[0]);
    let labels = json!({
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.version": VERSION,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "org.opencontainers.image.description": format!("Weft {} ({})", spec.name, spec.binaries.join(", ")),
    });
    let config = json!({
        "created": EPOCH,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": spec.user,
            "Env": ["PATH=/usr/local/bin"],
            "Entrypoint": [entrypoint],
            "WorkingDir": "/",
            "Labels": labels,
        },
        "rootfs": { "type": "layers", "diff_ids": [format!("sha256:{diff_id}")] },
        "history": [{ "created": EPOCH, "created_by": "cargo xtask image" }],
    });
    let config_desc = put_blob(&blobs, CONFIG, &serde_json::to_vec(&config)?)?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": config_desc,
        "layers": [layer_desc],
        "annotations": labels,
    });
    let mut manifest_desc = put_blob(&blobs, MANIFEST, &serde_json::to_vec(&manifest)?)?;
    manifest_desc["annotations"] = json!({ "org.opencontainers.image.ref.name": VERSION });
    manifest_desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
    let index = json!({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [manifest_desc],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index)?)?;
    std::fs::write(
        dir.join("oci-layout"),
        serde_json::to_vec(&json!({ "imageLayoutVersion": "1.0.0" }))?,
    )?;
    Ok(Built {
        name: spec.name,
        layout: dir.to_owned(),
        layer_bytes: layer.len() as u64,
        rootfs_bytes,
    })
}

/// The layer: directories, the two account files and the binaries (their
/// debug sections stripped), owned by root, in sorted order, time zero.
/// Returns the tar and the size of the files in it.
fn rootfs_tar(spec: &ImageSpec, bin_dir: &Path) -> Result<(Vec<u8>, u64)> {
    let mut files: Vec<(String, Vec<u8>, u32)> = vec![
        (
            "etc/passwd".into(),
            b"root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n".to_vec(),
            0o644,
        ),
        (
            "etc/group".into(),
            b"root:x:0:\nnonroot:x:65532:\n".to_vec(),
            0o644,
        ),
    ];
    for bin in spec.binaries {
        let path = bin_dir.join(bin);
        files.push((format!("usr/local/bin/{bin}"), stripped(&path)?, 0o755));
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    let dirs: &[(&str, u32)] = &[
        ("etc/", 0o755),
        ("home/", 0o755),
        ("home/nonroot/", 0o700),
        ("tmp/", 0o1777),
        ("usr/", 0o755),
        ("usr/local/", 0o755),
        ("usr/local/bin/", 0o755),
    ];
    let mut tar = tar::Builder::new(Vec::new());
    tar.mode(tar::HeaderMode::Deterministic);
    for (path, mode) in dirs {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(*mode);
        h.set_size(0);
        h.set_mtime(0);
        if *path == "home/nonroot/" {
            h.set_uid(65532);
            h.set_gid(65532);
        }
        h.set_cksum();
        tar.append_data(&mut h, path, std::io::empty())?;
    }
    let mut total = 0;
    for (path, bytes, mode) in &files {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(*mode);
        h.set_size(bytes.len() as u64);
        h.set_mtime(0);
        h.set_cksum();
        tar.append_data(&mut h, path, bytes.as_slice())?;
        total += bytes.len() as u64;
    }
    Ok((tar.into_inner()?, total))
}

/// The binary without its DWARF sections (symbols stay, for backtraces).
fn stripped(path: &Path) -> Result<Vec<u8>> {
    if !path.is_file() {
        bail!("{} was not built", path.display());
    }
    let out = path.with_extension("image-stripped");
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(path)
        .status()
        .context("running strip (binutils)")?;
    if !status.success() {
        bail!("strip --strip-debug {} failed", path.display());
    }
    let bytes = std::fs::read(&out)?;
    let _ = std::fs::remove_file(&out);
    Ok(bytes)
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stores `bytes` under its digest; returns its OCI descriptor.
fn put_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> Result<Value> {
    let digest = sha256(bytes);
    std::fs::write(blobs.join(&digest), bytes)?;
    Ok(json!({
        "mediaType": media_type,
        "digest": format!("sha256:{digest}"),
        "size": bytes.len(),
    }))
}
