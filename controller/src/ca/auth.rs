//! Who may ask the mesh CA (and the config stream) for what.
//!
//! - Authentication ([`Authenticator`]): bootstrap tokens mapped to node
//!   names in embedded mode ([`BootstrapTokens`]); ServiceAccount tokens
//!   checked with TokenReview in a cluster ([`TokenReviewAuthenticator`]).
//! - Authorization ([`authorize`]): the SPIFFE identity asked for must
//!   belong to a workload scheduled on the caller's node in the current
//!   model, and a workload's own token gets only its own identity.

use std::collections::HashMap;
use std::path::Path;

use tonic::metadata::MetadataMap;
use tonic::Status;
use weft_api::{Identity, MeshModel};

/// TokenReview `user.extra` key carrying the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid (maps to UNAUTHENTICATED).
    #[error("{0}")]
    Rejected(String),
    /// The token could not be checked (maps to UNAVAILABLE).
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Rejected(m) => Status::unauthenticated(m),
            AuthError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Who presented a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node the token is bound to.
    pub node: String,
    /// `Some((namespace, service account))`: a workload's own token (a
    /// waypoint's, say), which may obtain only its own identity. `None`: a
    /// node agent (the node's ztunnel), which may obtain the identities of
    /// the node's pods.
    pub workload: Option<(String, String)>,
}

/// Maps a bearer token to the node (and caller) it was issued for.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn node_of(&self, token: &str) -> Result<String, AuthError>;

    /// The caller behind `token`; by default a node agent of `node_of`.
    async fn caller_of(&self, token: &str) -> Result<Caller, AuthError> {
        Ok(Caller {
            node: self.node_of(token).await?,
            workload: None,
        })
    }
}

/// Whether `caller` may obtain a certificate for `id` under `model`: a
/// node agent for any workload on its node, a workload only for itself
/// (and only while it runs on the node its token is bound to).
pub fn authorize(model: &MeshModel, caller: &Caller, id: &Identity) -> Result<(), String> {
    if let Some((ns, sa)) = &caller.workload {
        let own = Identity::new(&model.trust_domain, ns, sa);
        if &own != id {
            return Err(format!(
                "a workload token ({ns}/{sa}) may only obtain its own identity {own}, not {id}"
            ));
        }
    }
    if !node_runs_identity(model, &caller.node, id) {
        return Err(format!(
            "node {} runs no workload with identity {id}; a ztunnel only gets identities of pods scheduled on its node",
            caller.node
        ));
    }
    Ok(())
}

/// Whether `node` runs a workload with identity `id` in `model`.
pub fn node_runs_identity(model: &MeshModel, node: &str, id: &Identity) -> bool {
    model
        .workloads
        .iter()
        .any(|w| w.node == node && &model.identity_of(w) == id)
}

/// The node of the request's `authorization: Bearer <token>`.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<String, Status> {
    Ok(authenticate_caller(auth, metadata).await?.node)
}

/// The caller behind the request's `authorization: Bearer <token>`.
pub async fn authenticate_caller(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
    let token = weft_api::proto::token_of_bearer(value).ok_or_else(|| {
        Status::unauthenticated("authorization metadata must be `Bearer <token>`")
    })?;
    Ok(auth.caller_of(token).await?)
}

/// Embedded mode: fixed bootstrap tokens, one per node.
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    by_token: HashMap<String, String>,
}

impl std::fmt::Debug for BootstrapTokens {
    // Tokens stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("nodes", &self.by_token.len())
            .finish()
    }
}

impl BootstrapTokens {
    pub fn new(node_tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            by_token: node_tokens
                .into_iter()
                .map(|(node, token)| (token, node))
                .collect(),
        }
    }

    /// Parses `node: token` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (node, token) = line
                .split_once(':')
                .map(|(n, t)| (n.trim(), t.trim()))
                .filter(|(n, t)| !n.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("line {}: want `node: token`", i + 1))?;
            pairs.push((node.to_owned(), token.to_owned()));
        }
        Ok(Self::new(pairs))
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read bootstrap tokens {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[tonic::async_trait]
impl Authenticator for BootstrapTokens {
    async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        self.by_token
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Rejected("unknown bootstrap token".into()))
    }
}

/// Cluster mode: the ztunnel's ServiceAccount token (projected, pod-bound),
/// checked with a TokenReview; the node comes from the token's
/// `authentication.kubernetes.io/node-name` extra.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    /// Usernames (`system:serviceaccount:<ns>:<sa>`) of node agents: the
    /// ztunnels, which get their node's pods' identities. Any other
    /// ServiceAccount gets only its own.
    node_agents: Vec<String>,
}

impl TokenReviewAuthenticator {
    /// `audiences` empty means the API server's default audience. With no
    /// node agents set, every caller is a node agent.
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self {
            client,
            audiences,
            node_agents: Vec::new(),
        }
    }

    /// The ServiceAccounts (`namespace/name`) that act for their node.
    pub fn with_node_agents<'a>(mut self, agents: impl IntoIterator<Item = &'a str>) -> Self {
        self.node_agents = agents
            .into_iter()
            .map(|a| format!("system:serviceaccount:{}", a.replacen('/', ":", 1)))
            .collect();
        self
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        Ok(self.caller_of(token).await?.node)
    }

    async fn caller_of(&self, token: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(format!(
                "token rejected by the API server: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let node = user
            .extra
            .and_then(|mut extra| extra.remove(NODE_NAME_EXTRA))
            .and_then(|v| v.into_iter().next())
            .ok_or_else(|| {
                AuthError::Rejected(format!(
                    "token is not bound to a pod on a node (no {NODE_NAME_EXTRA}); use the pod's projected ServiceAccount token"
                ))
            })?;
        if self.node_agents.is_empty() || self.node_agents.contains(&username) {
            return Ok(Caller {
                node,
                workload: None,
            });
        }
        let workload = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
            .ok_or_else(|| AuthError::Rejected(format!("{username:?} is not a ServiceAccount")))?;
        Ok(Caller {
            node,
            workload: Some(workload),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_tokens_get_only_their_own_identity() {
        let m = MeshModel::from_yaml(
            r#"
workloads:
  - { name: wp-0, namespace: shop, service_account: wp, node: n1, ips: [10.0.0.9] }
  - { name: web, namespace: shop, service_account: web, node: n1, ips: [10.0.0.2] }
"#,
        )
        .unwrap();
        let id = |sa: &str| Identity::new("cluster.local", "shop", sa);
        let agent = Caller {
            node: "n1".into(),
            workload: None,
        };
        let waypoint = Caller {
            node: "n1".into(),
            workload: Some(("shop".into(), "wp".into())),
        };
        assert!(authorize(&m, &agent, &id("web")).is_ok());
        assert!(authorize(&m, &agent, &id("wp")).is_ok());
        assert!(authorize(&m, &waypoint, &id("wp")).is_ok());
        let err = authorize(&m, &waypoint, &id("web")).unwrap_err();
        assert!(err.contains("only obtain its own identity"), "{err}");
        let elsewhere = Caller {
            node: "n2".into(),
            workload: Some(("shop".into(), "wp".into())),
        };
        assert!(authorize(&m, &elsewhere, &id("wp")).is_err());
    }

    #[test]
    fn bootstrap_tokens_parse() {
        let t = BootstrapTokens::parse("# nodes\nnode-1: abc\n\n node-2 : def \n").unwrap();
        assert_eq!(t.by_token.get("abc").map(String::as_str), Some("node-1"));
        assert_eq!(t.by_token.get("def").map(String::as_str), Some("node-2"));
        assert!(BootstrapTokens::parse("node-1 abc").is_err());
        assert!(BootstrapTokens::parse("node-1:").is_err());
    }
}
