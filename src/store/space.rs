//! Free space on the embedded store's filesystem, and what it still allows.
//!
//! sled cannot take a failed write back: once a write to its log fails
//! (`ENOSPC`), the database refuses every later write until it is opened
//! again, that is until Ferry restarts. So Ferry keeps sled from ever
//! meeting a full disk. Below `server.min_free_mb` it stops taking new
//! deferred calls; below half of it, it also stops the work that grows
//! the store (claiming batches, storing their results), keeping the rest
//! for what must go on: status changes, webhooks, and the purge that
//! frees space. Each resumes by itself once space returns.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::StoreError;

/// How old a reading of the free space may be. A round of intake at full
/// speed writes a few MB in this time; `min_free_mb` leaves far more.
const FRESH: Duration = Duration::from_millis(100);

/// What a store write is for, which decides how much room it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// A new deferred call: it needs the whole reserve above it.
    Intake,
    /// Work that adds data for calls already accepted (a claim, a batch's
    /// results): it may use the upper half of the reserve.
    Growth,
}

impl Need {
    /// The `need` label of `ferry_storage_low_space_refusals_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Intake => "intake",
            Need::Growth => "growth",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Need::Intake => "new deferred calls",
            Need::Growth => "claiming batches and storing results",
        }
    }
}

/// How much room there is, from most to least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Room {
    Enough = 0,
    /// Under `min_free`: intake waits.
    IntakeClosed = 1,
    /// Under half of `min_free`: growth waits too.
    GrowthClosed = 2,
}

impl Room {
    fn from_u8(v: u8) -> Room {
        match v {
            0 => Room::Enough,
            1 => Room::IntakeClosed,
            _ => Room::GrowthClosed,
        }
    }

    pub fn allows(self, need: Need) -> bool {
        match need {
            Need::Intake => self == Room::Enough,
            Need::Growth => self != Room::GrowthClosed,
        }
    }
}

/// The room `free` bytes leave when `min_free` must stay free.
pub fn room(free: u64, min_free: u64) -> Room {
    if free >= min_free {
        Room::Enough
    } else if free >= min_free / 2 {
        Room::IntakeClosed
    } else {
        Room::GrowthClosed
    }
}

/// Reads the bytes an unprivileged writer may still use on `dir`'s filesystem.
pub type Probe = Box<dyn Fn(&Path) -> std::io::Result<u64> + Send + Sync>;

/// The free space of one directory's filesystem, read at most every
/// [`FRESH`], and the writes it allows.
pub struct SpaceGuard {
    dir: PathBuf,
    min_free: u64,
    probe: Probe,
    started: Instant,
    /// Millis since `started` of the last reading, plus one (0: never read).
    read_at: AtomicU64,
    free: AtomicU64,
    /// The room at the last reading, to log each change once.
    room: AtomicU8,
    /// Counts refusals by need, once metrics are attached.
    refusals: std::sync::OnceLock<prometheus::IntCounterVec>,
}

impl SpaceGuard {
    /// Guards `dir`, keeping `min_free` bytes free (0: no guard).
    pub fn new(dir: &Path, min_free: u64) -> SpaceGuard {
        SpaceGuard::with_probe(dir, min_free, Box::new(available_bytes))
    }

    pub fn with_probe(dir: &Path, min_free: u64, probe: Probe) -> SpaceGuard {
        SpaceGuard {
            dir: dir.to_path_buf(),
            min_free,
            probe,
            started: Instant::now(),
            read_at: AtomicU64::new(0),
            free: AtomicU64::new(u64::MAX),
            room: AtomicU8::new(Room::Enough as u8),
            refusals: std::sync::OnceLock::new(),
        }
    }

    pub fn observe(&self, refusals: prometheus::IntCounterVec) {
        let _ = self.refusals.set(refusals);
    }

    pub fn min_free(&self) -> u64 {
        self.min_free
    }

    /// The free bytes, at most [`FRESH`] old.
    pub fn free_bytes(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64 + 1;
        let at = self.read_at.load(Ordering::Acquire);
        if at != 0 && now.saturating_sub(at) < FRESH.as_millis() as u64 {
            return self.free.load(Ordering::Acquire);
        }
        // Racing readers may both read; both store a fresh value.
        let free = match (self.probe)(&self.dir) {
            Ok(free) => free,
            Err(e) => {
                // Unknown is not full: refusing every call because a
                // statvfs failed would be an outage of its own.
                tracing::warn!(dir = %self.dir.display(), error = %e, "cannot read the free space of data_dir");
                u64::MAX
            }
        };
        self.free.store(free, Ordering::Release);
        self.read_at.store(now, Ordering::Release);
        self.note(room(free, self.min_free), free);
        free
    }

    /// Tests only: the next check reads the filesystem again.
    #[cfg(test)]
    pub(crate) fn forget_reading(&self) {
        self.read_at.store(0, Ordering::SeqCst);
    }

    /// `Ok` when there is room for `need`; otherwise the error intake answers
    /// `503 storage_unavailable` with, and the other writers wait on.
    pub fn check(&self, need: Need) -> Result<(), StoreError> {
        if self.min_free == 0 {
            return Ok(());
        }
        let free = self.free_bytes();
        if room(free, self.min_free).allows(need) {
            return Ok(());
        }
        if let Some(c) = self.refusals.get() {
            c.with_label_values(&[need.as_str()]).inc();
        }
        Err(StoreError::LowSpace {
            free,
            min_free: self.min_free,
            waiting: need.label(),
        })
    }

    /// Logs each change of room once: the line an operator finds at 3 a.m.
    fn note(&self, now: Room, free: u64) {
        let before = Room::from_u8(self.room.swap(now as u8, Ordering::AcqRel));
        if before == now {
            return;
        }
        let dir = self.dir.display();
        let min_free = self.min_free;
        match now {
            Room::Enough => tracing::info!(
                %dir, free, min_free,
                "data_dir has room again: deferred calls, claims and results resume"
            ),
            Room::IntakeClosed => tracing::warn!(
                %dir, free, min_free,
                "data_dir is under server.min_free_mb: new deferred calls are refused (503) \
                 until space returns; accepted calls go on"
            ),
            Room::GrowthClosed => tracing::error!(
                %dir, free, min_free,
                "data_dir is under half of server.min_free_mb: claims and result ingestion \
                 wait as well (nothing is lost; results stay upstream); free some space"
            ),
        }
    }
}

/// `statvfs`: the blocks an unprivileged writer may use, in bytes.
// The fields are u64 here and narrower on 32-bit targets.
#[allow(clippy::useless_conversion)]
pub fn available_bytes(dir: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok(u64::from(st.blocks_available()).saturating_mul(u64::from(st.fragment_size())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn room_closes_intake_first_then_growth() {
        assert_eq!(room(100, 100), Room::Enough);
        assert_eq!(room(99, 100), Room::IntakeClosed);
        assert_eq!(room(50, 100), Room::IntakeClosed);
        assert_eq!(room(49, 100), Room::GrowthClosed);
        assert_eq!(room(0, 0), Room::Enough);
        assert!(Room::Enough.allows(Need::Intake));
        assert!(!Room::IntakeClosed.allows(Need::Intake));
        assert!(Room::IntakeClosed.allows(Need::Growth));
        assert!(!Room::GrowthClosed.allows(Need::Growth));
    }

    fn fake(free: &Arc<AtomicU64>) -> Probe {
        let free = free.clone();
        Box::new(move |_| Ok(free.load(Ordering::SeqCst)))
    }

    #[test]
    fn the_guard_refuses_by_need_and_says_why() {
        let free = Arc::new(AtomicU64::new(1_000));
        let g = SpaceGuard::with_probe(Path::new("/nowhere"), 1_000, fake(&free));
        assert!(g.check(Need::Intake).is_ok());
        free.store(600, Ordering::SeqCst);
        // Still the reading of a moment ago.
        assert!(g.check(Need::Intake).is_ok());
        g.forget_reading();
        let e = g.check(Need::Intake).unwrap_err().to_string();
        assert!(e.contains("600 bytes free") && e.contains("1000"), "{e}");
        assert!(g.check(Need::Growth).is_ok());
        free.store(10, Ordering::SeqCst);
        g.forget_reading();
        assert!(g.check(Need::Growth).is_err());
        free.store(5_000, Ordering::SeqCst);
        g.forget_reading();
        assert!(g.check(Need::Intake).is_ok());
    }

    #[test]
    fn no_reserve_and_an_unreadable_filesystem_refuse_nothing() {
        let free = Arc::new(AtomicU64::new(0));
        assert!(
            SpaceGuard::with_probe(Path::new("/x"), 0, fake(&free))
                .check(Need::Intake)
                .is_ok()
        );
        let broken = SpaceGuard::with_probe(
            Path::new("/x"),
            1_000,
            Box::new(|_| Err(std::io::Error::other("no statvfs"))),
        );
        assert!(broken.check(Need::Intake).is_ok());
    }

    #[test]
    fn reads_a_real_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        assert!(available_bytes(dir.path()).unwrap() > 0);
        assert!(available_bytes(&dir.path().join("missing")).is_err());
    }
}
