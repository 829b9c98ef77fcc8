//! What every certificate Weft issues looks like: the mesh root, workload
//! leaves (SPIFFE id only) and the controller's serving certificate. Both
//! CAs (the controller's and the standalone one) issue exactly these.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SerialNumber,
};
use weft_api::Identity;

/// Root validity.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates are backdated by this much to tolerate clock skew between
/// nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// A self-signed mesh root for `trust_domain`: ECDSA P-256 (the caller's
/// key), CA:true, certificate and CRL signing, valid 10 years. Each root
/// gets a distinct subject (a random suffix in its CN), so two roots
/// trusted together during a rotation never share a name.
pub fn root_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(
        DnType::CommonName,
        format!("Weft mesh CA {:08x}", random_u32()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    set_validity(
        &mut params,
        now.checked_sub(BACKDATE).unwrap_or(now),
        now + ROOT_TTL,
    );
    params
}

/// A workload leaf: empty subject, one critical URI SAN = `identity`, not a
/// CA, digitalSignature, serverAuth + clientAuth, a random serial, valid
/// from [`BACKDATE`] before now for `ttl`. Returns the parameters with
/// (not_before, not_after).
pub fn workload_leaf_params(
    identity: &Identity,
    ttl: Duration,
) -> (CertificateParams, SystemTime, SystemTime) {
    let mut params = CertificateParams::default();
    // Like Istio: no subject, identity only in a SAN, which RFC 5280 then
    // requires to be critical (rcgen writes SANs non-critical, so it goes
    // in as a custom extension).
    params.distinguished_name = DistinguishedName::new();
    let mut san = CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        uri_san_der(identity.to_string().as_bytes()),
    );
    san.set_criticality(true);
    params.custom_extensions = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = truncate_to_secs(SystemTime::now());
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now + ttl;
    set_validity(&mut params, not_before, not_after);
    (params, not_before, not_after)
}

/// A TLS serving certificate (the controller's gRPC port): CN `cn`, DNS
/// SANs `names`, serverAuth only, valid from [`BACKDATE`] before now for
/// `ttl`.
pub fn serving_params(
    cn: &str,
    names: Vec<String>,
    ttl: Duration,
) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(names)?;
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    set_validity(
        &mut params,
        now.checked_sub(BACKDATE).unwrap_or(now),
        now + ttl,
    );
    Ok(params)
}

/// The cross-signed form of the CA certificate `ca_cert_pem` (a new root
/// during a rotation): the same subject, public key, subject key
/// identifier, basic constraints, key usages and validity, a new random
/// serial, and an authority key identifier naming the issuer that signs it
/// (the root it replaces). Sent after the leaf while both roots are
/// trusted, it lets a peer that knows only the old root verify leaves of
/// the new one.
pub fn cross_signed_params(ca_cert_pem: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::from_ca_cert_pem(ca_cert_pem)?;
    params.serial_number = Some(random_serial());
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// DER of `GeneralNames ::= SEQUENCE { uniformResourceIdentifier [6] IA5String }`.
fn uri_san_der(uri: &[u8]) -> Vec<u8> {
    let mut inner = vec![0x86];
    push_der_len(&mut inner, uri.len());
    inner.extend_from_slice(uri);
    let mut out = vec![0x30];
    push_der_len(&mut out, inner.len());
    out.extend_from_slice(&inner);
    out
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    // A failing system RNG would make the keys weak as well; a time-based
    // value still keeps serials distinct in that (theoretical) case.
    if rustls::crypto::aws_lc_rs::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
            .to_be_bytes();
        for (b, n) in bytes.iter_mut().zip(nanos.iter().rev()) {
            *b = *n;
        }
    }
    bytes
}

fn random_u32() -> u32 {
    u32::from_be_bytes(random_bytes::<4>())
}

/// A random positive certificate serial (128 bits).
pub fn random_serial() -> SerialNumber {
    let mut bytes = random_bytes::<16>();
    // Positive INTEGER, no leading zero octet ambiguity.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Sets rcgen's validity without naming the `time` crate: epoch plus an
/// offset, whole seconds.
pub fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let since_epoch = |t: SystemTime| {
        Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before);
    params.not_after = epoch + since_epoch(not_after);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_positive_and_distinct() {
        let a = random_serial();
        let b = random_serial();
        assert_ne!(a, b);
        assert!(a.as_ref()[0] & 0x80 == 0 && a.as_ref()[0] != 0);
    }

    #[test]
    fn long_uri_sans_use_long_form_lengths() {
        let uri = vec![b'a'; 300];
        let der = uri_san_der(&uri);
        // SEQUENCE, long form with two length octets, then [6] long form.
        assert_eq!(&der[..4], &[0x30, 0x82, 0x01, 0x30]);
        assert_eq!(&der[4..8], &[0x86, 0x82, 0x01, 0x2c]);
    }
}
