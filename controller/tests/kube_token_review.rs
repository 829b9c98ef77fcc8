//! The CA's cluster-mode authentication: a ztunnel's projected
//! ServiceAccount token checked with a TokenReview against a fake
//! Kubernetes API server (`support::FakeApi`, standing in for the real one,
//! which cannot run here), then the node it is bound to used for
//! authorization, through the real gRPC CA service.

mod support;

use serde_json::json;
use support::*;
use weft_controller::ca::{AuthError, Authenticator, TokenReviewAuthenticator};

fn bound_user(node: &str) -> serde_json::Value {
    json!({
        "username": "system:serviceaccount:weft-system:weft-ztunnel",
        "uid": "5f0c",
        "groups": ["system:serviceaccounts", "system:serviceaccounts:weft-system"],
        "extra": {
            "authentication.kubernetes.io/node-name": [node],
            "authentication.kubernetes.io/pod-name": ["weft-ztunnel-abcde"],
        },
    })
}

#[tokio::test]
async fn kube_token_review_authenticates_a_bound_token_and_names_its_node() {
    let fake = FakeApi::start(&[]).await;
    fake.add_token("tok-node1", &["weft-ca"], bound_user("node1"));
    let auth = TokenReviewAuthenticator::new(fake.client(), vec!["weft-ca".into()]);

    assert_eq!(auth.node_of("tok-node1").await.unwrap(), "node1");

    // The review went to the API server with the token and our audience.
    let reviews: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == format!("/{TOKEN_REVIEWS}"))
        .collect();
    assert_eq!(reviews.len(), 1);
    let spec = &reviews[0].body.as_ref().unwrap()["spec"];
    assert_eq!(spec["token"], "tok-node1");
    assert_eq!(spec["audiences"], json!(["weft-ca"]));
}

#[tokio::test]
async fn kube_token_review_refuses_unknown_wrong_audience_and_unbound_tokens() {
    let fake = FakeApi::start(&[]).await;
    fake.add_token("tok-other-aud", &["kubernetes"], bound_user("node1"));
    fake.add_token(
        "tok-unbound",
        &["weft-ca"],
        json!({ "username": "system:serviceaccount:shop:default", "extra": {} }),
    );
    let auth = TokenReviewAuthenticator::new(fake.client(), vec!["weft-ca".into()]);

    for (token, want) in [
        ("garbage", "invalid bearer token"),
        ("tok-other-aud", "audiences do not match"),
        ("tok-unbound", "not bound to a pod on a node"),
    ] {
        match auth.node_of(token).await {
            Err(AuthError::Rejected(msg)) => assert!(msg.contains(want), "{token}: {msg}"),
            other => panic!("{token}: expected a rejection, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn kube_token_review_unreachable_api_server_is_unavailable_not_rejected() {
    // A client to an address nothing listens on (port 9, discard, closed).
    let dead =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:9".parse().unwrap())).unwrap();
    let auth = TokenReviewAuthenticator::new(dead, vec!["weft-ca".into()]);
    match auth.node_of("tok").await {
        Err(AuthError::Unavailable(msg)) => assert!(msg.contains("TokenReview"), "{msg}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test]
async fn kube_token_review_tells_node_agents_from_workloads() {
    let fake = FakeApi::start(&[]).await;
    fake.add_token("tok-ztunnel", &["weft-ca"], bound_user("node1"));
    let mut waypoint = bound_user("node1");
    waypoint["username"] = json!("system:serviceaccount:shop:wp");
    fake.add_token("tok-waypoint", &["weft-ca"], waypoint);
    let auth = TokenReviewAuthenticator::new(fake.client(), vec!["weft-ca".into()])
        .with_node_agents(["weft-system/weft-ztunnel"]);

    let z = auth.caller_of("tok-ztunnel").await.unwrap();
    assert_eq!((z.node.as_str(), z.workload), ("node1", None));
    let w = auth.caller_of("tok-waypoint").await.unwrap();
    assert_eq!(w.node, "node1");
    assert_eq!(w.workload, Some(("shop".to_owned(), "wp".to_owned())));
}
