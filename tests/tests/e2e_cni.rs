//! The real `weft-cni` plugin per the CNI spec on the simulated cluster:
//! ADD in both orders a runtime and a controller may produce (the pod's
//! sandbox before its model entry, and the other way round), CHECK against
//! the kernel (a pod whose capture was taken apart is reported), DEL
//! (also of pods nobody knows, and with the ztunnel away), and names that
//! are not Kubernetes names refused before any path is built from them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;

use serde_json::{json, Value};
use weft_e2e::cluster::CniError;
use weft_e2e::mesh::Mesh;

fn code_of(err: &anyhow::Error) -> Option<u64> {
    err.downcast_ref::<CniError>().and_then(CniError::code)
}

fn cni_error(err: &anyhow::Error) -> String {
    match err.downcast_ref::<CniError>() {
        Some(e) => e.error.clone().unwrap_or(Value::Null).to_string(),
        None => format!("{err:#}"),
    }
}

/// A runtime creates the sandbox and calls ADD before the controller has
/// the pod in its model, or the model entry comes first: both end captured
/// and working, and a pod that opts out is released once its entry says so.
#[test]
fn e2e_cni_enrolls_in_either_order() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let server = mesh.add_pod(1, "shop", "server", "server").expect("server");
    mesh.serve_testapp(&server, 7000).expect("app");
    let target = format!("{}:7000", server.ip);

    // Sandbox first: ADD while the model does not know the pod. The
    // namespace label decides, so capture is in place before the app runs.
    let early = mesh.create_pod(0, "shop", "early").expect("pod");
    mesh.cni(&early, "ADD").expect("ADD before the model entry");
    mesh.wait_enrolled(0, &early, true)
        .expect("captured at ADD");
    mesh.cni(&early, "CHECK").expect("CHECK");
    mesh.record_pod(&early, "early", &[]).expect("model entry");
    mesh.assert_mtls_from(&early, &target, "spiffe://cluster.local/ns/shop/sa/early");

    // Model entry first (the harness's usual order).
    let late = mesh.create_pod(0, "shop", "late").expect("pod");
    mesh.record_pod(&late, "late", &[]).expect("model entry");
    mesh.cni(&late, "ADD").expect("ADD after the model entry");
    mesh.wait_enrolled(0, &late, true).expect("captured");
    mesh.assert_mtls_from(&late, &target, "spiffe://cluster.local/ns/shop/sa/late");

    // Sandbox first for a pod whose labels opt it out: captured by its
    // namespace at ADD, released when its model entry arrives.
    let opt = mesh.create_pod(0, "shop", "opt").expect("pod");
    mesh.cni(&opt, "ADD").expect("ADD");
    mesh.wait_enrolled(0, &opt, true)
        .expect("captured by the namespace");
    mesh.record_pod(&opt, "opt", &[("weft.dev/dataplane-mode", "none")])
        .expect("model entry");
    mesh.wait_enrolled(0, &opt, false)
        .expect("released by its label");
    mesh.cni(&opt, "CHECK").expect("CHECK of a released pod");
    let v = mesh.connect(&opt, &target);
    assert_eq!(v["ok"], true, "an opted-out pod talks directly: {v}");

    // Deleted as a runtime does: DEL, then the sandbox goes.
    mesh.delete_pod(&late).expect("delete");
    let dump = mesh.config_dump(0).expect("dump");
    assert!(
        !dump["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .any(|p| p["pod"] == "shop/late"),
        "{dump}"
    );
    assert_eq!(
        mesh.connect(&early, &target)["ok"],
        true,
        "the others are untouched"
    );
}

/// CHECK looks at the kernel; DEL releases and forgets, and succeeds for
/// anything (unknown pods, repeated, ztunnel away), as the spec requires.
#[test]
fn e2e_cni_check_and_del_through_the_real_plugin() {
    let mut mesh = Mesh::new(1, &["shop"]).expect("mesh");
    let pod = mesh.add_pod(0, "shop", "web", "web").expect("pod");
    let plain = mesh.add_pod(0, "legacy", "old", "default").expect("pod");
    mesh.wait_enrolled(0, &pod, true).expect("enrolled");
    mesh.cni(&pod, "CHECK").expect("CHECK of a captured pod");
    mesh.cni(&plain, "CHECK")
        .expect("CHECK of a pod the model leaves out");

    // Take part of the capture away behind the ztunnel's back: the fwmark
    // rule the inbound leg's replies need.
    let out = pod
        .command("ip")
        .args(["-4", "rule", "del", "fwmark", "0x5eb2", "lookup", "1515"])
        .output()
        .expect("ip rule del");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = mesh.cni(&pod, "CHECK").expect_err("CHECK must see it");
    let text = cni_error(&err);
    assert_eq!(code_of(&err), Some(100), "{text}");
    assert!(
        text.contains("capture is incomplete") && text.contains("rule fwmark 0x5eb2 lookup 1515"),
        "CHECK names what is missing: {text}"
    );

    // DEL: released and forgotten, record gone.
    let record = mesh.ztunnel_state_dir(0).join("pods/shop__web.json");
    assert!(record.is_file());
    mesh.cni(&pod, "DEL").expect("DEL");
    let dump = mesh.config_dump(0).expect("dump");
    assert!(
        !dump["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .any(|p| p["pod"] == "shop/web"),
        "{dump}"
    );
    assert!(!record.exists(), "DEL left the pod's record");
    let err = mesh.cni(&pod, "CHECK").expect_err("CHECK of a deleted pod");
    assert!(
        cni_error(&err).contains("unknown to this ztunnel"),
        "{}",
        cni_error(&err)
    );

    // DEL again, DEL of a pod never added, DEL with no netns (the spec
    // allows an empty CNI_NETNS on DEL): all succeed.
    mesh.cni(&pod, "DEL").expect("second DEL");
    let mut ghost = pod.clone();
    ghost.name = "never-added".into();
    ghost.container_id = format!("{:064x}", 7u8);
    mesh.cni(&ghost, "DEL").expect("DEL of an unknown pod");
    let mut gone = ghost.clone();
    gone.netns_path = "/nonexistent/netns".into();
    mesh.cni(&gone, "DEL").expect("DEL with a vanished netns");
    // With the ztunnel away too.
    mesh.stop_ztunnel(0).expect("stop");
    mesh.cni(&plain, "DEL").expect("DEL with the ztunnel away");
    mesh.cni(&ghost, "DEL")
        .expect("DEL of an unknown pod with the ztunnel away");
}

/// `K8S_POD_NAMESPACE=../../..` (and other names Kubernetes refuses): a CNI
/// error, nothing written; the ztunnel refuses the same names if anything
/// bypasses the plugin.
#[test]
fn e2e_cni_refuses_names_kubernetes_would() {
    let mut mesh = Mesh::new(1, &["shop"]).expect("mesh");
    let pod = mesh.add_pod(0, "shop", "web", "web").expect("pod");
    let state = mesh.ztunnel_state_dir(0);
    let listing = |dir: &std::path::Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    };
    let watched = [
        state.join("pods"),
        state.clone(),
        state.join(".."),
        state.join("../.."),
        state.join("../../.."),
    ];
    let before: Vec<_> = watched.iter().map(|d| listing(d)).collect();
    let conf = json!({ "state_dir": state });
    for (ns, name) in [
        ("../../..", "web"),
        ("shop", "../../../x"),
        ("shop/..", "web"),
        ("Shop", "web"),
        ("shop", "a..b"),
        ("sh_op", "web"),
    ] {
        let mut evil = pod.clone();
        evil.namespace = ns.into();
        evil.name = name.into();
        for cmd in ["ADD", "CHECK"] {
            let err = mesh
                .cni_with(&evil, cmd, &conf)
                .expect_err("an invalid name must be refused");
            let text = cni_error(&err);
            assert_eq!(code_of(&err), Some(4), "{cmd} {ns}/{name}: {text}");
            assert!(text.contains("not a valid Kubernetes name"), "{text}");
        }
        // DEL of something that cannot be a pod of ours has nothing to undo.
        mesh.cni_with(&evil, "DEL", &conf).expect("DEL");
    }
    let after: Vec<_> = watched.iter().map(|d| listing(d)).collect();
    assert_eq!(before, after, "a refused request wrote something");

    // Straight to the ztunnel's socket, past the plugin.
    let mut s = UnixStream::connect(mesh.cni_socket(0)).expect("socket");
    let req = json!({
        "command": "ADD", "container_id": pod.container_id, "netns": pod.netns_path,
        "pod_namespace": "../../..", "pod_name": "web", "ips": [pod.ip],
    });
    s.write_all(format!("{req}\n").as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("answer");
    let resp: Value = serde_json::from_str(&line).expect("JSON answer");
    assert_eq!(resp["ok"], false, "{resp}");
    assert!(
        resp["error"]
            .as_str()
            .unwrap_or_default()
            .contains("not a valid Kubernetes name"),
        "{resp}"
    );
    assert_eq!(
        watched.iter().map(|d| listing(d)).collect::<Vec<_>>(),
        before
    );
}
