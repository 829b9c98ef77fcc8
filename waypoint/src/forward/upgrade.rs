//! Protocol upgrades (WebSocket, ...) on HTTP/1.1: the upgrade headers go
//! through, and a 101 from upstream joins the client's connection to the
//! endpoint's. `h2c` is not one of them: RFC 9113 deprecates it, and the
//! request is answered in HTTP/1.1.

use http::request::Parts;
use http::{header, HeaderValue, Response, StatusCode};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tracing::debug;
use weft_hbone::Transferred;

use super::head::connection_options;
use super::reply::{LocalReply, Stage};
use crate::body::Body;
use crate::context::Proto;

/// An upgrade the client asked for: the protocol, and the client's side of
/// the connection once hyper hands it over.
pub struct Upgrade {
    protocol: HeaderValue,
    downstream: Option<OnUpgrade>,
}

impl Upgrade {
    /// Takes the upgrade out of a request, if it is one we carry
    /// (HTTP/1.1, `Connection: upgrade`, not `h2c`).
    pub fn take(parts: &mut Parts, proto: Proto) -> Option<Self> {
        if proto != Proto::Http1 {
            return None;
        }
        let wants = connection_options(&parts.headers).any(|t| t.eq_ignore_ascii_case("upgrade"));
        let u = parts.headers.get(header::UPGRADE)?;
        if !wants || u.as_bytes().eq_ignore_ascii_case(b"h2c") {
            return None;
        }
        let protocol = u.clone();
        Some(Self {
            protocol,
            downstream: parts.extensions.remove::<OnUpgrade>(),
        })
    }

    /// Puts the upgrade headers back on the upstream head (after the
    /// hop-by-hop headers were stripped).
    pub fn ask_upstream(&self, parts: &mut Parts) {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, self.protocol.clone());
    }
}

/// A `101 Switching Protocols` from upstream: joins both connections when
/// the client asked for the upgrade, refuses it (502) when it did not.
pub fn switch(mut response: Response<Body>, upgrade: Option<Upgrade>) -> Stage<Response<Body>> {
    let Some(Upgrade {
        protocol,
        downstream: Some(down),
    }) = upgrade
    else {
        return Err(LocalReply::new(
            "bad_upgrade",
            StatusCode::BAD_GATEWAY,
            "upstream switched protocols unasked\n",
        ));
    };
    let up = hyper::upgrade::on(&mut response);
    tokio::spawn(join(down, up));
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response.headers_mut().insert(header::UPGRADE, protocol);
    Ok(response)
}

/// Copies bytes between the two upgraded connections until both close.
async fn join(down: OnUpgrade, up: OnUpgrade) {
    match tokio::try_join!(down, up) {
        Ok((d, u)) => {
            let mut d = TokioIo::new(d);
            let mut u = TokioIo::new(u);
            let moved = Transferred::default();
            if let Err(e) = weft_hbone::copy_bidirectional(&mut d, &mut u, &moved).await {
                debug!(component = "waypoint", error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(component = "waypoint", error = %e, "upgrade failed"),
    }
}
