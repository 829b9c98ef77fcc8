//! The standalone CA: a root kept in a directory (generated on first start,
//! or any CA certificate and key an operator puts there) that signs
//! workload certificates without a controller. The controller's mesh CA
//! signs with the same [`Signer`] and the same parameters.

use std::path::Path;
use std::time::Duration;

use weft_api::Identity;

use crate::files::{
    create_private_dir, read_optional, write_atomic, ROOT_CERT_FILE, ROOT_KEY_FILE,
};
use crate::signer::{generate_root, Signer};
use crate::{PkiError, TrustBundle, WorkloadCert};

pub struct LocalCa {
    signer: Signer,
    root_pem: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.signer.trust_domain())
            .finish_non_exhaustive()
    }
}

impl LocalCa {
    /// A fresh self-signed root for `trust_domain`, kept in memory only.
    pub fn generate(trust_domain: &str) -> Result<LocalCa, PkiError> {
        let root = generate_root(trust_domain)?;
        let signer = Signer::from_pem(&root.cert_pem, &root.key_pem, Vec::new(), trust_domain)?;
        Ok(LocalCa {
            signer,
            root_pem: root.cert_pem,
        })
    }

    /// Loads `dir/root-cert.pem` and `dir/root-key.pem`: a root written by
    /// [`LocalCa::load_or_generate`], or any CA certificate and key.
    pub fn load(dir: &Path, trust_domain: &str) -> Result<LocalCa, PkiError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let read = |p: &Path| {
            read_optional(p)?.ok_or_else(|| PkiError::Io {
                path: p.to_owned(),
                source: std::io::ErrorKind::NotFound.into(),
            })
        };
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        let signer = Signer::from_pem(&cert_pem, &key_pem, Vec::new(), trust_domain).map_err(
            |e| match e {
                PkiError::InvalidCa(reason) => {
                    PkiError::InvalidCa(format!("{}: {reason}", dir.display()))
                }
                other => other,
            },
        )?;
        Ok(LocalCa {
            signer,
            root_pem: cert_pem,
        })
    }

    /// Loads the root from `dir`, or generates one and writes it there
    /// (directory 0700, key 0600, atomically).
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<LocalCa, PkiError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return LocalCa::load(dir, trust_domain),
            (true, false) => return Err(PkiError::Incomplete(cert_path, key_path)),
            (false, true) => return Err(PkiError::Incomplete(key_path, cert_path)),
            (false, false) => {}
        }
        let root = generate_root(trust_domain)?;
        create_private_dir(dir)?;
        // Key first: a crash in between leaves "key without cert", which
        // `Incomplete` reports instead of silently regenerating.
        write_atomic(&key_path, root.key_pem.as_bytes(), 0o600)?;
        write_atomic(&cert_path, root.cert_pem.as_bytes(), 0o644)?;
        let signer = Signer::from_pem(&root.cert_pem, &root.key_pem, Vec::new(), trust_domain)?;
        Ok(LocalCa {
            signer,
            root_pem: root.cert_pem,
        })
    }

    pub fn trust_domain(&self) -> &str {
        self.signer.trust_domain()
    }

    pub fn root_pem(&self) -> String {
        self.root_pem.clone()
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            roots: vec![self.signer.cert().clone()],
        }
    }

    /// A workload leaf for `identity`, valid for `ttl` (see
    /// [`crate::params::workload_leaf_params`]).
    pub fn sign(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, PkiError> {
        self.signer.sign_workload(identity, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::files::write_atomic;

    #[test]
    fn any_ca_certificate_and_key_can_be_the_standalone_root() {
        // An operator's own root: its subject is nothing Weft would write.
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Acme Platform Root");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Acme");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        let root = params.self_signed(&key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        write_atomic(
            &dir.path().join(ROOT_CERT_FILE),
            root.pem().as_bytes(),
            0o644,
        )
        .unwrap();
        write_atomic(
            &dir.path().join(ROOT_KEY_FILE),
            key.serialize_pem().as_bytes(),
            0o600,
        )
        .unwrap();

        let ca = LocalCa::load_or_generate(dir.path(), "cluster.local").unwrap();
        let id = Identity::new("cluster.local", "shop", "cart");
        let leaf = ca.sign(&id, Duration::from_secs(60)).unwrap();
        assert_eq!(leaf.identity, id);
        assert_eq!(ca.trust_bundle().roots[0].as_ref(), root.der().as_ref());
        // The leaf chains to the operator's root.
        let bundle = ca.trust_bundle();
        let anchor = webpki::anchor_from_trusted_cert(&bundle.roots[0]).unwrap();
        let ee = webpki::EndEntityCert::try_from(&leaf.chain[0]).unwrap();
        ee.verify_for_usage(
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .all,
            &[anchor],
            &[],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .expect("the leaf verifies under the operator's root");
    }
}
