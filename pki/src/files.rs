//! Where a CA keeps its root on disk: a private directory, the key 0600,
//! every file written to a temporary name and renamed so that a reader (or
//! a crash) never sees half a file.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::PkiError;

/// The signing root's certificate.
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// The signing root's private key (mode 0600).
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// The file's contents, or `None` when it does not exist.
pub fn read_optional(path: &Path) -> Result<Option<String>, PkiError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(PkiError::io(path)(e)),
    }
}

/// Writes `contents` with `mode` to a temporary name beside `path`, syncs,
/// and renames it over `path`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), PkiError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(PkiError::io(path))
}

/// Removes `path`; absent is fine.
pub fn remove_if_exists(path: &Path) -> Result<(), PkiError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PkiError::io(path)(e)),
        _ => Ok(()),
    }
}

/// Creates `dir` (and its parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), PkiError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(PkiError::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_leave_no_temporary_files_and_keep_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("ca");
        create_private_dir(&sub).unwrap();
        let path = sub.join("key.pem");
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(read_optional(&path).unwrap().as_deref(), Some("two"));
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = fs::metadata(&sub).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        assert_eq!(fs::read_dir(&sub).unwrap().count(), 1);
        remove_if_exists(&path).unwrap();
        remove_if_exists(&path).unwrap();
        assert_eq!(read_optional(&path).unwrap(), None);
    }
}
