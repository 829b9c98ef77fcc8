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
