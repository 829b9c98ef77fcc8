//! What the model builder reads: every object the controller watches
//! ([`ClusterState`]), and the helpers every part of the builder reads
//! them with. A leaf: the other `model` files import it, it imports none
//! of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::ResourceExt;
use weft_api::crd::{self, Gateway};

/// Everything the controller watches, as the API server shows it.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub authorization_policies: Vec<Arc<crd::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<crd::PeerAuthentication>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub http_routes: Vec<Arc<crd::HTTPRoute>>,
    pub grpc_routes: Vec<Arc<crd::GRPCRoute>>,
    pub traffic_policies: Vec<Arc<crd::TrafficPolicy>>,
}

/// An object's (namespace, name); cluster-scoped objects have an empty
/// namespace.
pub(crate) fn ns_name<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Sorts objects by (namespace, name); a later duplicate replaces an earlier
/// one (as a second `kubectl apply` of the same object would).
pub(crate) fn by_key<K: ResourceExt>(objs: &[Arc<K>]) -> BTreeMap<(String, String), &K> {
    objs.iter()
        .map(|o| (ns_name(o.as_ref()), o.as_ref()))
        .collect()
}

/// Parses a Gateway API duration (`^([0-9]{1,5}(h|m|s|ms)){1,4}$`, e.g.
/// `10s`, `500ms`, `1h30m`) into milliseconds. Route timeouts and
/// TrafficPolicy fields are both written this way.
pub(crate) fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let bad = || {
        format!("{s:?} is not a Gateway API duration (up to four parts like 1h, 30m, 10s, 500ms)")
    };
    let mut rest = s;
    let mut total = 0u64;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit_ms, len) = if rest.starts_with("ms") {
            (1, 2)
        } else if rest.starts_with('h') {
            (3_600_000, 1)
        } else if rest.starts_with('m') {
            (60_000, 1)
        } else if rest.starts_with('s') {
            (1_000, 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += n * unit_ms;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_the_gateway_api_format() {
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("500ms"), Ok(500));
        assert_eq!(parse_duration_ms("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration_ms("1h1m1s1ms"), Ok(3_661_001));
        assert_eq!(parse_duration_ms("0s"), Ok(0));
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "123456s",
            "1h1m1s1ms1h",
            "10 s",
            "-1s",
            "1d",
        ] {
            let e = parse_duration_ms(bad).unwrap_err();
            assert!(e.contains("Gateway API duration"), "{bad}: {e}");
        }
    }
}
