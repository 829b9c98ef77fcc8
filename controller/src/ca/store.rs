//! Where the self-managed root lives between restarts: the [`RootStore`]
//! trait, what a store keeps ([`StoredRoots`]), and the store of embedded
//! mode, a directory ([`DirRootStore`]). Cluster mode keeps the same in a
//! Kubernetes Secret (`secret_store`), under the same names.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use weft_pki::files::{
    create_private_dir, read_optional, remove_if_exists, write_atomic, ROOT_CERT_FILE,
    ROOT_KEY_FILE,
};
use weft_pki::pem::split_certs;
use weft_pki::PkiError;

use super::error::CaError;

/// The roots the signing root replaced that are still trusted (absent when
/// there is no rotation in progress).
pub const PREVIOUS_ROOTS_FILE: &str = "previous-roots.pem";
/// Unix seconds of the last rotation (kept during the overlap).
pub const ROTATED_AT_FILE: &str = "rotated-at";
/// The signing root cross-signed by the roots it replaced, newest first
/// (kept during the overlap, sent after every leaf).
pub const CROSS_SIGNED_FILE: &str = "cross-signed.pem";
/// Embedded mode: create this file in the CA directory to rotate the root.
pub const ROTATE_REQUEST_FILE: &str = "rotate-root";
/// Cluster mode: set this annotation on the root Secret to rotate the root.
pub const ROTATE_ANNOTATION: &str = "weft.dev/rotate-root";

/// How often the directory store looks for changes.
const DIR_POLL: Duration = Duration::from_secs(2);

/// What a [`RootStore`] keeps: the signing root and the roots it replaced
/// that are still trusted (rotation overlap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRoots {
    pub cert_pem: String,
    /// Never log it.
    pub key_pem: String,
    pub previous_roots_pem: Vec<String>,
    /// During an overlap: the signing root as issued by the root it
    /// replaced, then that root as issued by the one before (if that one
    /// is still trusted too), and so on. Every chain the CA issues carries
    /// them after the leaf, so a peer that knows only an older root still
    /// verifies it.
    pub cross_signed_pem: Vec<String>,
    /// When the current root replaced the previous ones (Unix seconds):
    /// the overlap is counted from here, across restarts.
    pub rotated_at_unix: Option<u64>,
    /// An operator asked for a rotation (read by `load`; `save` leaves the
    /// request alone, `clear_rotation_request` consumes it).
    pub rotation_requested: bool,
}

impl StoredRoots {
    /// The same roots (ignoring bookkeeping).
    pub fn same_roots(&self, other: &StoredRoots) -> bool {
        self.cert_pem == other.cert_pem
            && self.previous_roots_pem == other.previous_roots_pem
            && self.cross_signed_pem == other.cross_signed_pem
    }
}

/// Where the self-managed root lives between restarts.
#[tonic::async_trait]
pub trait RootStore: Send + Sync + 'static {
    /// `None` on first start (nothing stored yet).
    async fn load(&self) -> Result<Option<StoredRoots>, CaError>;
    async fn save(&self, roots: &StoredRoots) -> Result<(), CaError>;
    /// Consumes an operator's rotation request (after the rotation).
    async fn clear_rotation_request(&self) -> Result<(), CaError>;
    /// Wakes up when what is stored may have changed (another replica
    /// rotated, an operator asked for a rotation).
    fn changes(&self) -> futures::stream::BoxStream<'static, ()>;
}

/// A directory (embedded mode): `root-cert.pem`, `root-key.pem` (0600),
/// and during an overlap `previous-roots.pem`, `cross-signed.pem` and
/// `rotated-at`; every file is written atomically.
pub struct DirRootStore {
    dir: PathBuf,
}

impl DirRootStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

#[tonic::async_trait]
impl RootStore for DirRootStore {
    async fn load(&self) -> Result<Option<StoredRoots>, CaError> {
        let cert_path = self.dir.join(ROOT_CERT_FILE);
        let key_path = self.dir.join(ROOT_KEY_FILE);
        let (cert, key) = (read_optional(&cert_path)?, read_optional(&key_path)?);
        let previous = read_optional(&self.dir.join(PREVIOUS_ROOTS_FILE))?;
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert_pem), Some(key_pem)) => Ok(Some(StoredRoots {
                cert_pem,
                key_pem,
                previous_roots_pem: previous.map(|p| split_certs(&p)).unwrap_or_default(),
                cross_signed_pem: read_optional(&self.dir.join(CROSS_SIGNED_FILE))?
                    .map(|p| split_certs(&p))
                    .unwrap_or_default(),
                rotated_at_unix: read_optional(&self.dir.join(ROTATED_AT_FILE))?
                    .and_then(|t| t.trim().parse().ok()),
                rotation_requested: self.dir.join(ROTATE_REQUEST_FILE).exists(),
            })),
            (Some(_), None) => Err(PkiError::Incomplete(cert_path, key_path).into()),
            (None, Some(_)) => Err(PkiError::Incomplete(key_path, cert_path).into()),
        }
    }

    async fn save(&self, roots: &StoredRoots) -> Result<(), CaError> {
        create_private_dir(&self.dir)?;
        let previous = self.dir.join(PREVIOUS_ROOTS_FILE);
        if roots.previous_roots_pem.is_empty() {
            remove_if_exists(&previous)?;
        } else {
            write_atomic(
                &previous,
                roots.previous_roots_pem.concat().as_bytes(),
                0o644,
            )?;
        }
        let cross = self.dir.join(CROSS_SIGNED_FILE);
        if roots.cross_signed_pem.is_empty() {
            remove_if_exists(&cross)?;
        } else {
            write_atomic(&cross, roots.cross_signed_pem.concat().as_bytes(), 0o644)?;
        }
        let rotated_at = self.dir.join(ROTATED_AT_FILE);
        match roots.rotated_at_unix {
            Some(t) => write_atomic(&rotated_at, t.to_string().as_bytes(), 0o644)?,
            None => remove_if_exists(&rotated_at)?,
        }
        // Key first: a crash in between leaves a new key with the old cert,
        // which loading rejects (the key does not belong to the
        // certificate) instead of silently signing with a mismatched pair.
        write_atomic(
            &self.dir.join(ROOT_KEY_FILE),
            roots.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.dir.join(ROOT_CERT_FILE),
            roots.cert_pem.as_bytes(),
            0o644,
        )?;
        Ok(())
    }

    async fn clear_rotation_request(&self) -> Result<(), CaError> {
        Ok(remove_if_exists(&self.dir.join(ROTATE_REQUEST_FILE))?)
    }

    /// A tick every couple of seconds: the files are small and local.
    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        use futures::StreamExt;
        futures::stream::unfold((), |()| async {
            tokio::time::sleep(DIR_POLL).await;
            Some(((), ()))
        })
        .boxed()
    }
}

/// Now, in Unix seconds (what `rotated_at_unix` counts in).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_pki::signer::generate_root;

    fn roots_with_overlap() -> StoredRoots {
        let current = generate_root("td").unwrap();
        StoredRoots {
            cert_pem: current.cert_pem,
            key_pem: current.key_pem,
            previous_roots_pem: vec![
                generate_root("td").unwrap().cert_pem,
                generate_root("td").unwrap().cert_pem,
            ],
            cross_signed_pem: vec![
                generate_root("td").unwrap().cert_pem,
                generate_root("td").unwrap().cert_pem,
            ],
            rotated_at_unix: Some(1_700_000_000),
            rotation_requested: false,
        }
    }

    #[tokio::test]
    async fn a_directory_keeps_every_previous_root_and_the_rotation_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirRootStore::new(dir.path().join("ca"));
        assert_eq!(store.load().await.unwrap(), None);
        let saved = roots_with_overlap();
        store.save(&saved).await.unwrap();
        assert_eq!(store.load().await.unwrap(), Some(saved.clone()));

        // Retiring removes the overlap's files.
        let retired = StoredRoots {
            previous_roots_pem: Vec::new(),
            cross_signed_pem: Vec::new(),
            rotated_at_unix: None,
            ..saved
        };
        store.save(&retired).await.unwrap();
        assert!(!dir.path().join("ca").join(PREVIOUS_ROOTS_FILE).exists());
        assert!(!dir.path().join("ca").join(ROTATED_AT_FILE).exists());
        assert!(!dir.path().join("ca").join(CROSS_SIGNED_FILE).exists());
        assert_eq!(store.load().await.unwrap(), Some(retired));
    }

    #[tokio::test]
    async fn a_lone_certificate_or_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirRootStore::new(dir.path());
        store.save(&roots_with_overlap()).await.unwrap();
        std::fs::remove_file(dir.path().join(ROOT_KEY_FILE)).unwrap();
        let err = store.load().await.unwrap_err();
        assert!(
            matches!(err, CaError::Pki(PkiError::Incomplete(..))),
            "{err}"
        );
    }
}
