//! The CNI installer (`weft-cni install | remove | preflight`), run as the
//! real binary against conflists shaped like real primary CNIs' (multi-line
//! with nested arrays, one-line, strings holding brackets and escaped
//! quotes) in a scratch node layout.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_weft-cni");

struct Node {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Node {
    fn new() -> Node {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path().to_owned();
        for d in ["bin", "net.d", "secret"] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        Node { _tmp: tmp, root }
    }

    fn conf(&self, name: &str) -> PathBuf {
        self.root.join("net.d").join(name)
    }

    fn write_conf(&self, name: &str, text: &str) -> PathBuf {
        let p = self.conf(name);
        std::fs::write(&p, text).expect("write conf");
        p
    }

    fn run(&self, args: &[&str], extra_env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_clear()
            .env("WEFT_CNI_BIN_DIR", self.root.join("bin"))
            .env("WEFT_CNI_CONF_DIR", self.root.join("net.d"))
            .env("WEFT_CNI_SOCKET", "/var/run/weft/cni.sock")
            .env("WEFT_MOUNTINFO", self.root.join("mountinfo"));
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd.output().expect("run weft-cni")
    }

    fn once(&self) -> Output {
        self.run(&["install", "--once"], &[])
    }

    fn remove(&self) -> Output {
        self.run(&["remove"], &[])
    }

    fn installed_binary(&self) -> PathBuf {
        self.root.join("bin/weft-cni")
    }
}

fn ok(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "weft-cni failed: {stderr}");
    stderr
}

fn chain(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read conf");
    let v: Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not JSON after the edit ({e}): {text}"));
    v["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .map(|p| p["type"].as_str().unwrap_or("?").to_owned())
        .collect::<Vec<_>>()
        .join(",")
}

/// Install, install again (no change), remove (the original bytes back).
fn round_trip(node: &Node, name: &str, want: &str) {
    let conf = node.conf(name);
    let original = std::fs::read(&conf).expect("read");
    ok(&node.once());
    assert!(node.installed_binary().is_file(), "binary not installed");
    assert_eq!(chain(&conf), want);
    let installed = std::fs::read(&conf).expect("read");
    ok(&node.once());
    assert_eq!(
        std::fs::read(&conf).expect("read"),
        installed,
        "a second install changed the file"
    );
    ok(&node.remove());
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&conf).expect("read")),
        String::from_utf8_lossy(&original),
        "remove did not restore the original"
    );
    assert!(!node.installed_binary().exists(), "remove left the binary");
}

#[test]
fn kindnet_conflist_round_trips() {
    let node = Node::new();
    node.write_conf(
        "10-kindnet.conflist",
        r#"{
	"cniVersion": "0.3.1",
	"name": "kindnet",
	"plugins": [
	{
		"type": "ptp",
		"ipMasq": false,
		"ipam": {
			"type": "host-local",
			"dataDir": "/run/cni-ipam-state",
			"routes": [
				{ "dst": "0.0.0.0/0" }
			],
			"ranges": [
				[ { "subnet": "10.244.0.0/24" } ]
			]
		}
		,
		"mtu": 1500
	},
	{
		"type": "portmap",
		"capabilities": {
			"portMappings": true
		}
	}
	]
}
"#,
    );
    round_trip(&node, "10-kindnet.conflist", "ptp,portmap,weft-cni");
    // The installed binary is the plugin itself.
    ok(&node.once());
    let v = Command::new(node.installed_binary())
        .arg("--version")
        .output()
        .expect("run installed");
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn one_line_conflist_with_tricky_strings_round_trips() {
    let node = Node::new();
    node.write_conf(
        "05-tricky.conflist",
        "{\"cniVersion\":\"1.0.0\",\"name\":\"x [y]\",\"plugins\":[{\"type\":\"bridge\",\"note\":\"a \\\"quoted\\\" ] and } and \\\\\"},{\"type\":\"tuning\",\"plugins\":[\"nested\"]}],\"after\":\"ok\"}\n",
    );
    round_trip(&node, "05-tricky.conflist", "bridge,tuning,weft-cni");
    ok(&node.once());
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(node.conf("05-tricky.conflist")).unwrap())
            .unwrap();
    assert_eq!(v["after"], "ok");
    assert_eq!(v["name"], "x [y]");
}

#[test]
fn picks_the_first_config_by_name_and_leaves_no_temporary_files() {
    let node = Node::new();
    node.write_conf(
        "20-b.conflist",
        r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"b"}]}"#,
    );
    node.write_conf(
        "10-a.conflist",
        r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"}]}"#,
    );
    node.write_conf("00-readme.txt", "not a config\n");
    std::fs::create_dir_all(node.conf("00-dir.conflist")).unwrap();
    ok(&node.once());
    assert_eq!(chain(&node.conf("10-a.conflist")), "a,weft-cni");
    assert_eq!(chain(&node.conf("20-b.conflist")), "b");
    for dir in ["net.d", "bin"] {
        for e in std::fs::read_dir(node.root.join(dir)).unwrap() {
            let name = e.unwrap().file_name();
            assert!(
                !name.to_string_lossy().starts_with('.'),
                "left a temporary file {name:?} in {dir}"
            );
        }
    }
}

#[test]
fn replaces_a_stale_entry() {
    let node = Node::new();
    let conf = node.write_conf(
        "10-a.conflist",
        r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"},{ "type" : "weft-cni", "ztunnel_socket": "/old.sock"},{"type":"z"}]}"#,
    );
    ok(&node.once());
    assert_eq!(chain(&conf), "a,z,weft-cni");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("/var/run/weft/cni.sock"), "{text}");
    assert!(!text.contains("/old.sock"), "stale entry kept: {text}");
}

#[test]
fn refuses_a_single_plugin_conf_and_leaves_it_alone() {
    let node = Node::new();
    let original = r#"{"cniVersion":"0.4.0","name":"single","type":"bridge"}"#;
    let conf = node.write_conf("10-single.conf", original);
    let out = node.once();
    assert!(!out.status.success(), "install into a .conf succeeded");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a .conflist"), "unclear message: {err}");
    ok(&node.remove());
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), original);
}

#[test]
fn refuses_a_chain_with_nothing_to_follow_and_bad_json() {
    let node = Node::new();
    node.write_conf("10-a.conflist", r#"{"cniVersion":"1.0.0","plugins":[]}"#);
    let out = node.once();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no plugin to chain weft-cni after"));
    node.write_conf(
        "10-a.conflist",
        r#"{"cniVersion":"1.0.0","plugins":[{"type":"a"},]}"#,
    );
    let out = node.once();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot parse"));
}

#[test]
fn waits_for_the_primary_cni() {
    let node = Node::new();
    let err = ok(&node.once());
    assert!(
        err.contains("waiting for the primary CNI"),
        "no waiting message: {err}"
    );
    assert!(node.installed_binary().is_file(), "binary not installed");
}

#[test]
fn preflight_checks_host_mounts() {
    let node = Node::new();
    let mountinfo = "25 1 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw\n\
41 25 0:35 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:15 - bpf bpf rw,mode=700\n\
42 25 0:36 / /host/sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
    std::fs::write(node.root.join("mountinfo"), mountinfo).unwrap();
    ok(&node.run(&["preflight"], &[]));
    let without_bpf: String = mountinfo
        .lines()
        .filter(|l| !l.contains(" bpf bpf "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(node.root.join("mountinfo"), without_bpf).unwrap();
    let out = node.run(&["preflight"], &[]);
    assert!(!out.status.success(), "preflight passed without bpffs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a bpf filesystem"),
        "unclear message: {err}"
    );
    // Hybrid layouts mount cgroup v2 at <root>/unified.
    let hybrid = mountinfo.replace("/host/sys/fs/cgroup ", "/host/sys/fs/cgroup/unified ");
    std::fs::write(node.root.join("mountinfo"), hybrid).unwrap();
    ok(&node.run(&["preflight"], &[]));
}

/// With a token and CA, the entry names a kubeconfig the plugin can use,
/// with paths as the host sees them; remove takes it away again.
#[test]
fn writes_the_plugins_kubeconfig_and_entry() {
    let node = Node::new();
    std::fs::write(node.root.join("secret/token"), "tok-1\n").unwrap();
    std::fs::write(node.root.join("secret/ca.crt"), "CA PEM\n").unwrap();
    let conf = node.write_conf(
        "10-a.conflist",
        r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"}]}"#,
    );
    let token = node.root.join("secret/token");
    let ca = node.root.join("secret/ca.crt");
    let env = [
        ("WEFT_CNI_TOKEN_FILE", token.to_str().unwrap()),
        ("WEFT_CNI_CA_FILE", ca.to_str().unwrap()),
        ("WEFT_CNI_HOST_CONF_DIR", "/etc/cni/net.d"),
        ("WEFT_CNI_EXCLUDE_NAMESPACES", "kube-system,weft-system"),
        ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
        ("KUBERNETES_SERVICE_PORT", "443"),
    ];
    ok(&node.run(&["install", "--once"], &env));
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    let entry = &v["plugins"][1];
    assert_eq!(entry["type"], "weft-cni");
    assert_eq!(entry["kubeconfig"], "/etc/cni/net.d/weft.d/kubeconfig");
    assert_eq!(
        entry["exclude_namespaces"],
        serde_json::json!(["kube-system", "weft-system"])
    );
    assert_eq!(entry["state_dir"], "/var/run/weft/ztunnel");
    let kc = std::fs::read_to_string(node.conf("weft.d/kubeconfig")).unwrap();
    assert!(kc.contains("server: \"https://10.96.0.1:443\""), "{kc}");
    assert!(
        kc.contains("tokenFile: \"/etc/cni/net.d/weft.d/token\""),
        "{kc}"
    );
    assert_eq!(
        std::fs::read_to_string(node.conf("weft.d/token")).unwrap(),
        "tok-1\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node.conf("weft.d/token"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "the token is readable by others: {mode:o}");
    // A re-issued token is picked up on the next pass.
    std::fs::write(node.root.join("secret/token"), "tok-2\n").unwrap();
    ok(&node.run(&["install", "--once"], &env));
    assert_eq!(
        std::fs::read_to_string(node.conf("weft.d/token")).unwrap(),
        "tok-2\n"
    );
    ok(&node.remove());
    assert!(!node.conf("weft.d").exists(), "remove left the kubeconfig");
    assert_eq!(chain(&conf), "a");
}

/// The token Secret may still be empty when the installer starts: the
/// chain is installed anyway and the kubeconfig follows on a later pass.
#[test]
fn an_empty_token_secret_does_not_stop_the_install() {
    let node = Node::new();
    std::fs::write(node.root.join("secret/ca.crt"), "CA PEM\n").unwrap();
    let conf = node.write_conf(
        "10-a.conflist",
        r#"{"cniVersion":"1.0.0","name":"a","plugins":[{"type":"a"}]}"#,
    );
    let token = node.root.join("secret/token");
    let ca = node.root.join("secret/ca.crt");
    let env = [
        ("WEFT_CNI_TOKEN_FILE", token.to_str().unwrap()),
        ("WEFT_CNI_CA_FILE", ca.to_str().unwrap()),
        ("WEFT_CNI_KUBERNETES_API", "https://10.96.0.1:443"),
    ];
    let err = ok(&node.run(&["install", "--once"], &env));
    assert!(err.contains("no token"), "{err}");
    assert_eq!(chain(&conf), "a,weft-cni");
    assert!(!node.conf("weft.d/kubeconfig").exists());
    std::fs::write(&token, "tok\n").unwrap();
    ok(&node.run(&["install", "--once"], &env));
    assert!(node.conf("weft.d/kubeconfig").is_file());
}

#[test]
fn an_invalid_excluded_namespace_is_refused() {
    let node = Node::new();
    let out = node.run(
        &["install", "--once"],
        &[("WEFT_CNI_EXCLUDE_NAMESPACES", "kube-system,../etc")],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid Kubernetes name"));
}
