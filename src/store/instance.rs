//! The instance id: a random name a data_dir gets once and keeps, written
//! into every upstream file and batch Ferry makes from it. Two Ferrys may
//! share one upstream key (two data_dirs, or a rotated deployment); each
//! sweeps, adopts and deletes only upstream objects carrying its own id,
//! because batch numbers alone repeat across data_dirs.
//!
//! On PostgreSQL the cluster shares one instance id (in the database), and
//! the data_dir's names the node itself in the leases it takes, so a node
//! restarted on its data_dir picks up its own leases at once. Either way the
//! data_dir is locked for the process's life: two processes never share it.

use std::io::Write;
use std::path::Path;

use super::StoreError;

/// The file in data_dir that holds the id.
const FILE: &str = "instance_id";
/// Hex digits of an id (64 random bits).
const LEN: usize = 16;

/// A fresh random instance id.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// Reads the data_dir's instance id, creating it on first use. The file is
/// written to a temporary name, fsynced, renamed and the directory fsynced,
/// so a crash leaves either no id or a whole one: never a half-written id
/// that would disown the uploads already made under it. Call with the
/// data_dir locked (after [`super::Store::open`]), so two processes never
/// race to create it.
pub fn load_or_create(data_dir: &Path) -> Result<String, StoreError> {
    let path = data_dir.join(FILE);
    let io = |e: std::io::Error| StoreError::Flush(format!("{}: {e}", path.display()));
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if is_valid(id) {
                return Ok(id.to_owned());
            }
            Err(StoreError::Corrupt(format!(
                "{} does not hold an instance id ({LEN} hex digits); \
                 it names this data_dir's upstream files, so it is not replaced",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = new_id();
            let tmp = data_dir.join(format!("{FILE}.tmp"));
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(id.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
            std::fs::File::open(data_dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            tracing::info!(instance = %id, "this data_dir's instance id was created");
            Ok(id)
        }
        Err(e) => Err(io(e)),
    }
}

fn is_valid(id: &str) -> bool {
    id.len() == LEN && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The upload name of a batch's input file.
pub fn upload_filename(instance: &str, batch: u64) -> String {
    format!("ferry-{instance}-batch-{batch}.jsonl")
}

/// The batch number of an upload this instance named, or `None` for any
/// other file (another instance's, the pre-instance `ferry-batch-<n>.jsonl`
/// format, or not Ferry's at all).
pub fn own_upload(filename: &str, instance: &str) -> Option<u64> {
    let n = filename
        .strip_prefix("ferry-")?
        .strip_prefix(instance)?
        .strip_prefix("-batch-")?
        .strip_suffix(".jsonl")?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

/// Creates the data dir if needed and takes `ferry.lock` in it, exclusively
/// and without waiting.
/// The kernel drops the lock with the process, so a crash leaves none behind.
pub fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    let path = dir.join("ferry.lock");
    let lock_err = |source| StoreError::Lock {
        path: path.display().to_string(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(lock_err)?;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(lock_err)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::InUse),
        Err(std::fs::TryLockError::Error(e)) => Err(lock_err(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_id_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let id = load_or_create(dir.path()).unwrap();
        assert!(is_valid(&id), "{id}");
        assert_eq!(load_or_create(dir.path()).unwrap(), id);
        let other = tempfile::tempdir().unwrap();
        assert_ne!(load_or_create(other.path()).unwrap(), id);
        std::fs::write(dir.path().join(FILE), "garbage").unwrap();
        assert!(load_or_create(dir.path()).is_err());
    }

    #[test]
    fn only_own_uploads_are_recognised() {
        let me = "00112233aabbccdd";
        assert_eq!(own_upload(&upload_filename(me, 42), me), Some(42));
        assert_eq!(
            own_upload(&upload_filename("ffff0000ffff0000", 42), me),
            None
        );
        assert_eq!(own_upload("ferry-batch-42.jsonl", me), None);
        assert_eq!(own_upload(&format!("ferry-{me}-batch-.jsonl"), me), None);
        assert_eq!(own_upload(&format!("ferry-{me}-batch-+4.jsonl"), me), None);
        assert_eq!(own_upload("input.jsonl", me), None);
    }
}
