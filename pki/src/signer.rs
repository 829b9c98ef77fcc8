//! A CA certificate and its key, checked to belong together, that signs the
//! certificates of [`crate::params`].

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, CertificateSigningRequestParams, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_api::Identity;

use crate::params::{cross_signed_params, root_params, workload_leaf_params};
use crate::pem::cert_der;
use crate::{PkiError, WorkloadCert};

/// The key and issuer a CA signs with.
pub struct Signer {
    trust_domain: String,
    key: KeyPair,
    /// rcgen's view of the issuing certificate (same subject and key).
    issuer: rcgen::Certificate,
    /// The issuing certificate as distributed (byte-exact).
    cert_der: CertificateDer<'static>,
    /// Certificates sent after the leaf (intermediates; never the root).
    chain_pem: Vec<String>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

/// A freshly generated root, as it is stored.
pub struct RootMaterial {
    pub cert_pem: String,
    /// Never log it.
    pub key_pem: String,
}

/// A new self-signed root for `trust_domain` ([`root_params`], ECDSA P-256).
pub fn generate_root(trust_domain: &str) -> Result<RootMaterial, PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = root_params(trust_domain).self_signed(&key)?;
    Ok(RootMaterial {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

impl Signer {
    /// A signer for an existing CA certificate (a Weft root, or any CA a
    /// user supplies): checks that the key belongs to it and that its
    /// subject can be reproduced byte for byte (chain building compares
    /// names exactly). `chain_pem` is what follows the leaf in every chain
    /// issued (intermediates up to, not including, the root).
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: Vec<String>,
        trust_domain: &str,
    ) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| PkiError::InvalidCa(format!("no usable private key: {e}")))?;
        let der = cert_der(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(der.as_ref())
            .map_err(|e| PkiError::InvalidCa(format!("unparseable CA certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(PkiError::InvalidCa(
                "the certificate is not a CA (basicConstraints CA:false or absent)".into(),
            ));
        }
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(PkiError::InvalidCa(
                "the private key does not belong to the CA certificate".into(),
            ));
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| PkiError::InvalidCa(format!("CA certificate: {e}")))?;
        let issuer = params.self_signed(&key)?;
        let (_, rebuilt) = x509_parser::parse_x509_certificate(issuer.der().as_ref())
            .map_err(|e| PkiError::InvalidCa(format!("internal: {e}")))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err(PkiError::InvalidCa(
                "the CA certificate's subject cannot be reproduced exactly; re-issue it with UTF8String or PrintableString names".into(),
            ));
        }
        Ok(Self {
            trust_domain: trust_domain.to_owned(),
            key,
            issuer,
            cert_der: der,
            chain_pem,
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The issuing certificate (the root, for a self-managed CA).
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    fn check_domain(&self, identity: &Identity) -> Result<(), PkiError> {
        if identity.trust_domain != self.trust_domain {
            return Err(PkiError::WrongTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        Ok(())
    }

    /// `leaf` then the intermediates, one PEM block each.
    fn chain_of(&self, leaf: &rcgen::Certificate) -> Vec<String> {
        let mut chain = vec![leaf.pem()];
        chain.extend(self.chain_pem.iter().cloned());
        chain
    }

    /// Signs a workload leaf for the identity and key of `csr`.
    pub fn sign_csr(&self, csr: Csr, ttl: Duration) -> Result<IssuedCert, PkiError> {
        self.check_domain(&csr.identity)?;
        let (params, _, not_after) = workload_leaf_params(&csr.identity, ttl);
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.params.public_key,
        };
        let leaf = request.signed_by(&self.issuer, &self.key)?;
        Ok(IssuedCert {
            identity: csr.identity,
            chain_pem: self.chain_of(&leaf),
            not_after,
        })
    }

    /// A workload leaf with a key generated here (the standalone CA signs
    /// for its own node's pods).
    pub fn sign_workload(
        &self,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<WorkloadCert, PkiError> {
        self.check_domain(identity)?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (params, not_before, not_after) = workload_leaf_params(identity, ttl);
        let leaf = params.signed_by(&key, &self.issuer, &self.key)?;
        let mut chain = vec![leaf.der().clone()];
        for pem in &self.chain_pem {
            chain.push(cert_der(pem)?);
        }
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain,
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ))),
            not_before,
            not_after,
        })
    }

    /// Signs `params` (a serving certificate, say) for a new key; returns
    /// the chain PEM (leaf first) and the key PEM.
    pub fn sign_with_new_key(
        &self,
        params: CertificateParams,
    ) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let leaf = params.signed_by(&key, &self.issuer, &self.key)?;
        Ok((self.chain_of(&leaf).concat(), key.serialize_pem()))
    }
}

impl Signer {
    /// Cross-signs another CA (the root replacing this one): its
    /// certificate re-issued by this signer, for the key in `ca_key_pem`
    /// (see [`cross_signed_params`]). Returns the PEM.
    pub fn cross_sign(&self, ca_cert_pem: &str, ca_key_pem: &str) -> Result<String, PkiError> {
        let key = KeyPair::from_pem(ca_key_pem)
            .map_err(|e| PkiError::InvalidCa(format!("no usable private key: {e}")))?;
        let params = cross_signed_params(ca_cert_pem)
            .map_err(|e| PkiError::InvalidCa(format!("CA certificate to cross-sign: {e}")))?;
        Ok(params.signed_by(&key, &self.issuer, &self.key)?.pem())
    }
}

/// A signed workload leaf, as the controller's CA answers it.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub identity: Identity,
    /// Leaf first, then intermediates; one PEM block each.
    pub chain_pem: Vec<String>,
    pub not_after: SystemTime,
}

/// A parsed, signature-checked certificate request.
pub struct Csr {
    pub identity: Identity,
    params: CertificateSigningRequestParams,
}

impl Csr {
    /// Parses a PEM CSR and reads its SPIFFE identity: exactly one URI SAN
    /// and nothing else in the SAN.
    pub fn from_pem(pem: &str) -> Result<Csr, PkiError> {
        let params = CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| PkiError::BadCsr(format!("not a valid signed PKCS#10 request: {e}")))?;
        let identity = match params.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri
                .as_str()
                .parse::<Identity>()
                .map_err(|e| PkiError::BadCsr(e.to_string()))?,
            _ => {
                return Err(PkiError::BadCsr(
                    "the request must carry exactly one subjectAltName: the SPIFFE URI".into(),
                ))
            }
        };
        Ok(Csr { identity, params })
    }

    /// A request for `identity` with a fresh P-256 key: the CSR PEM the
    /// data plane sends, and the key PEM it keeps.
    pub fn generate(identity: &Identity) -> Result<(String, String), PkiError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| PkiError::BadCsr(format!("identity is not a valid URI SAN: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr_pem = params.serialize_request(&key)?.pem()?;
        Ok((csr_pem, key.serialize_pem()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{identity_of_cert, TrustBundle};

    #[test]
    fn a_generated_root_signs_csrs_and_workload_leaves() {
        let root = generate_root("cluster.local").unwrap();
        let signer =
            Signer::from_pem(&root.cert_pem, &root.key_pem, vec![], "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let (csr, key) = Csr::generate(&id).unwrap();
        let issued = signer
            .sign_csr(Csr::from_pem(&csr).unwrap(), Duration::from_secs(60))
            .unwrap();
        let cert = WorkloadCert::from_pem(&issued.chain_pem.concat(), &key).unwrap();
        assert_eq!(cert.identity, id);
        let leaf = signer.sign_workload(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(identity_of_cert(&leaf.chain[0]).unwrap(), id);
        assert_eq!(
            TrustBundle::from_pem(&root.cert_pem).unwrap().roots[0],
            *signer.cert()
        );
        let foreign = Identity::new("other.domain", "shop", "cart");
        assert!(matches!(
            signer.sign_workload(&foreign, Duration::from_secs(60)),
            Err(PkiError::WrongTrustDomain { .. })
        ));
    }

    #[test]
    fn a_cross_signed_root_lets_the_old_root_verify_new_leaves() {
        let old = generate_root("td").unwrap();
        let new = generate_root("td").unwrap();
        let old_signer = Signer::from_pem(&old.cert_pem, &old.key_pem, vec![], "td").unwrap();
        let cross = old_signer.cross_sign(&new.cert_pem, &new.key_pem).unwrap();
        let new_der = cert_der(&new.cert_pem).unwrap();
        let old_der = cert_der(&old.cert_pem).unwrap();
        // Same subject, key and key identifier as the new root; issued by
        // the old one.
        let cross_der = cert_der(&cross).unwrap();
        let (_, c) = x509_parser::parse_x509_certificate(cross_der.as_ref()).unwrap();
        let (_, n) = x509_parser::parse_x509_certificate(new_der.as_ref()).unwrap();
        let (_, o) = x509_parser::parse_x509_certificate(old_der.as_ref()).unwrap();
        assert_eq!(c.subject().as_raw(), n.subject().as_raw());
        assert_eq!(c.issuer().as_raw(), o.subject().as_raw());
        assert_eq!(c.public_key().raw, n.public_key().raw);
        assert!(c.is_ca());
        assert_ne!(c.serial, n.serial);
        let ski = |x: &x509_parser::certificate::X509Certificate<'_>| {
            x.iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    x509_parser::extensions::ParsedExtension::SubjectKeyIdentifier(k) => {
                        Some(k.0.to_vec())
                    }
                    _ => None,
                })
        };
        assert_eq!(ski(&c), ski(&n));

        let id = Identity::new("td", "shop", "cart");
        let plain = Signer::from_pem(&new.cert_pem, &new.key_pem, vec![], "td").unwrap();
        let bridged =
            Signer::from_pem(&new.cert_pem, &new.key_pem, vec![cross.clone()], "td").unwrap();
        let alone = plain.sign_workload(&id, Duration::from_secs(60)).unwrap();
        let with_cross = bridged.sign_workload(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(with_cross.chain.len(), 2);
        assert!(alone.chains_to(&new_der));
        assert!(!alone.chains_to(&old_der), "no path to the old root alone");
        assert!(with_cross.chains_to(&new_der));
        assert!(
            with_cross.chains_to(&old_der),
            "through the cross-signed root"
        );
        let old_leaf = old_signer
            .sign_workload(&id, Duration::from_secs(60))
            .unwrap();
        assert!(!old_leaf.chains_to(&new_der));
    }

    #[test]
    fn mismatched_key_and_non_ca_certificates_are_refused() {
        let a = generate_root("td").unwrap();
        let b = generate_root("td").unwrap();
        let err = Signer::from_pem(&a.cert_pem, &b.key_pem, vec![], "td").unwrap_err();
        assert!(err.to_string().contains("does not belong"), "{err}");
        let signer = Signer::from_pem(&a.cert_pem, &a.key_pem, vec![], "td").unwrap();
        let (leaf, key) = signer
            .sign_with_new_key(
                crate::params::serving_params("x", vec!["x".into()], Duration::from_secs(60))
                    .unwrap(),
            )
            .unwrap();
        let err = Signer::from_pem(&leaf, &key, vec![], "td").unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
    }
}
