//! The OCI images `cargo xtask image` writes (under `<target>/oci/`; `cargo
//! xtask test` builds them from debug binaries before the tests run), read
//! by independent tools: skopeo parses and copies each layout (checking
//! every blob's digest), umoci unpacks it to a root filesystem, and each
//! binary runs `--version` chrooted there as the image's user, with no libc
//! or shell beside it. Then the chart as rendered by `cargo xtask test`'s
//! chart checks may name only these images.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
const REGISTRY: &str = "ghcr.io/weft-mesh";

/// (image, binaries with the entrypoint first, user).
const IMAGES: &[(&str, &[&str], &str)] = &[
    (
        "weft-controller",
        &["weft-controller", "weftctl"],
        "65532:65532",
    ),
    ("weft-ztunnel", &["weft-ztunnel", "weft-cni"], "0:0"),
    ("weft-waypoint", &["weft-waypoint"], "65532:65532"),
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// `<target>/oci`, from this test binary's place in `<target>/<profile>/deps`.
fn oci_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let target = exe
        .ancestors()
        .nth(3)
        .expect("the test binary is in <target>/<profile>/deps")
        .to_owned();
    let dir = target.join("oci");
    assert!(
        dir.join("weft-ztunnel/index.json").is_file(),
        "no images in {}: build them with `cargo xtask image` (`cargo xtask test` does)",
        dir.display()
    );
    dir
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (cargo xtask setup installs skopeo and umoci)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The blob a descriptor names, checked against its digest and size.
fn blob(layout: &Path, desc: &Value) -> Vec<u8> {
    let digest = desc["digest"].as_str().expect("digest");
    let hex = digest.strip_prefix("sha256:").expect("a sha256 digest");
    let bytes = std::fs::read(layout.join("blobs/sha256").join(hex)).expect("blob present");
    assert_eq!(
        sha256_hex(&bytes),
        hex,
        "blob {digest} does not match its digest"
    );
    assert_eq!(
        desc["size"].as_u64(),
        Some(bytes.len() as u64),
        "size of {digest}"
    );
    bytes
}

#[test]
fn images_parse_unpack_and_run_their_binaries() {
    let oci = oci_dir();
    let scratch = tempfile::tempdir().expect("tempdir");
    for (name, binaries, user) in IMAGES {
        let layout = oci.join(name);
        let reference = format!("oci:{}:{VERSION}", layout.display());

        // Our own reading of the layout: every digest and size holds, and
        // the config's diff_id is the uncompressed layer's.
        let index: Value =
            serde_json::from_slice(&std::fs::read(layout.join("index.json")).expect("index"))
                .expect("index.json parses");
        assert_eq!(index["schemaVersion"], 2);
        let m = &index["manifests"][0];
        assert_eq!(
            m["annotations"]["org.opencontainers.image.ref.name"], VERSION,
            "{name}: tagged with the workspace version"
        );
        let manifest: Value = serde_json::from_slice(&blob(&layout, m)).expect("manifest parses");
        let config: Value =
            serde_json::from_slice(&blob(&layout, &manifest["config"])).expect("config parses");
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "{name}: one layer");
        let gz = blob(&layout, &layers[0]);
        let tar = gunzip(&gz);
        assert_eq!(
            config["rootfs"]["diff_ids"][0].as_str(),
            Some(format!("sha256:{}", sha256_hex(&tar)).as_str()),
            "{name}: diff_id"
        );

        // skopeo's reading: the same manifest and config; and a copy (what
        // a user does to push them into a registry) verifies every blob.
        let raw = json_of(&run(
            Command::new("skopeo").args(["inspect", "--raw", &reference])
        ));
        assert_eq!(raw, manifest, "{name}: skopeo sees our manifest");
        let cfg = json_of(&run(
            Command::new("skopeo").args(["inspect", "--config", &reference])
        ));
        assert_eq!(cfg["architecture"], "amd64");
        assert_eq!(cfg["os"], "linux");
        assert_eq!(cfg["config"]["User"], *user, "{name}: user");
        let entry = format!("/usr/local/bin/{}", binaries[0]);
        assert_eq!(cfg["config"]["Entrypoint"], serde_json::json!([entry]));
        let copy = scratch.path().join(format!("{name}-copy"));
        run(Command::new("skopeo")
            .args(["copy", "--quiet", &reference])
            .arg(format!("dir:{}", copy.display())));

        // umoci's unpacking, then each binary from the bare root filesystem.
        let bundle = scratch.path().join(format!("{name}-bundle"));
        run(Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:{VERSION}", layout.display()))
            .arg(&bundle));
        let rootfs = bundle.join("rootfs");
        let mut files = BTreeSet::new();
        collect_files(&rootfs, &rootfs, &mut files);
        let mut want: BTreeSet<String> = ["etc/group", "etc/passwd"].map(String::from).into();
        for b in *binaries {
            want.insert(format!("usr/local/bin/{b}"));
        }
        assert_eq!(files, want, "{name}: nothing but the binaries and accounts");
        for bin in *binaries {
            let out = run(Command::new("chroot")
                .arg(format!("--userspec={user}"))
                .arg(&rootfs)
                .arg(format!("/usr/local/bin/{bin}"))
                .arg("--version"));
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(bin) && text.contains(VERSION),
                "{name}: {bin} --version printed {text:?}"
            );
        }
        let mib = |b: usize| b as f64 / 1048576.0;
        eprintln!(
            "{REGISTRY}/{name}:{VERSION}: layer {:.1} MiB compressed, {:.1} MiB unpacked",
            mib(gz.len()),
            mib(tar.len())
        );
    }
}

fn gunzip(gz: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new("gzip")
        .args(["-dc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = gz.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().expect("writer").expect("write to gzip");
    assert!(out.status.success(), "the layer is not gzip");
    out.stdout
}

fn collect_files(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(dir).expect("read rootfs") {
        let e = e.expect("entry");
        let p = e.path();
        if e.file_type().expect("type").is_dir() {
            collect_files(root, &p, out);
        } else {
            out.insert(
                p.strip_prefix(root)
                    .expect("under root")
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
}

/// Every image the chart's renderings name, in pod specs and in the
/// controller's setting for the waypoints it deploys.
fn images_named(rendered: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for doc in serde_yaml::Deserializer::from_str(rendered) {
        let v = Value::deserialize(doc).expect("rendered YAML");
        walk(&v, &mut out);
    }
    out
}

use serde::Deserialize;

fn walk(v: &Value, out: &mut BTreeSet<String>) {
    match v {
        Value::Object(m) => {
            if let Some(Value::String(i)) = m.get("image") {
                out.insert(i.clone());
            }
            if m.get("name").and_then(Value::as_str) == Some("WEFT_WAYPOINT_IMAGE") {
                if let Some(Value::String(i)) = m.get("value") {
                    out.insert(i.clone());
                }
            }
            m.values().for_each(|x| walk(x, out));
        }
        Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
        _ => {}
    }
}

#[test]
fn the_chart_names_only_the_images_built() {
    let oci = oci_dir();
    let built: BTreeSet<String> = IMAGES
        .iter()
        .filter(|(name, _, _)| oci.join(name).join("index.json").is_file())
        .map(|(name, _, _)| format!("{REGISTRY}/{name}:{VERSION}"))
        .collect();
    assert_eq!(built.len(), IMAGES.len(), "every image was built");

    // The chart's defaults are what xtask writes: registry and version.
    let root = workspace();
    let chart: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("charts/weft/Chart.yaml")).expect("Chart.yaml"),
    )
    .expect("Chart.yaml parses");
    assert_eq!(chart["appVersion"], VERSION, "Chart.yaml appVersion");
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(root.join("charts/weft/values.yaml")).expect("values.yaml"),
    )
    .expect("values.yaml parses");
    assert_eq!(values["image"]["registry"], REGISTRY);

    let dir = root.join("target/weft-chart");
    let mut renders: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e}: the chart checks of `cargo xtask test` render it there",
                dir.display()
            )
        })
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("rendered-"))
        })
        .collect();
    renders.sort();
    assert!(
        !renders.is_empty(),
        "no rendered chart in {}",
        dir.display()
    );
    for file in renders {
        let named = images_named(&std::fs::read_to_string(&file).expect("read"));
        let foreign: Vec<_> = named.difference(&built).collect();
        assert!(
            foreign.is_empty(),
            "{} names images `cargo xtask image` does not build: {foreign:?}",
            file.display()
        );
        if file.ends_with("rendered-default.yaml") {
            assert_eq!(named, built, "the default install uses all three images");
        }
    }
}
