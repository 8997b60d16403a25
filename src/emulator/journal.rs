//! The emulator's durable state: an append-only journal of what happened,
//! plus one file per stored File's content, under one directory:
//!
//! ```text
//! <dir>/journal.jsonl       one JSON event per line, fsynced before the answer
//! <dir>/contents/<file id>  the bytes of each File (uploads and batch outputs)
//! ```
//!
//! Why a journal and not sled (Ferry's own store): the emulator is lazy, so
//! what must survive is a short list of *decisions* — a file stored or
//! deleted, a batch created, validated, run up to line k, cancelled, finished,
//! the clock moved — and everything else (a batch's state at any time, which
//! lines are due, the answer to each line) is a pure function of those, worked
//! out again on replay. An event is small and written once; the bulky parts
//! (input files of up to 200 MB, outputs) go to their own files, written and
//! fsynced once, instead of into B-tree leaves that sled would copy on every
//! later write. At open the journal is replayed into memory, and reads are
//! served from memory as before: a read that changes nothing writes nothing.
//!
//! Ordering: a content file is written and fsynced (with its directory)
//! before the event that names it; an event is fsynced before the change it
//! records is visible to any caller. A crash can therefore leave a content
//! file no event names (removed at the next open) or a half-written last line
//! (cut off at the next open; it was never acknowledged), nothing worse.
//!
//! The journal is never compacted: it grows by a few hundred bytes per batch
//! plus each executed line's `custom_id`, which the in-memory emulator keeps
//! for its stats anyway.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use super::config::Profile;

/// The journal's layout version, its first line.
pub const FORMAT: u32 = 1;

const JOURNAL: &str = "journal.jsonl";
const CONTENTS: &str = "contents";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is in use by another process: is a second emulator running on this directory?")]
    InUse { path: String },
    #[error("{path}, line {line}: {message}")]
    Corrupt {
        path: String,
        line: usize,
        message: String,
    },
    #[error(
        "{path} was written in emulator journal format {found}; this build reads format {FORMAT}"
    )]
    Format { path: String, found: u32 },
}

/// A clock time (or offset) that must come back bit for bit: written as
/// Rust's shortest round-trip decimal in a string, which `str::parse` reads
/// back exactly (serde_json's own float parsing may be one ulp off).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Exact(pub f64);

impl Serialize for Exact {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:?}", self.0))
    }
}

impl<'de> Deserialize<'de> for Exact {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Exact, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Exact)
            .ok_or_else(|| serde::de::Error::custom(format!("not a finite number: {text:?}")))
    }
}

/// A File object's fields (its content is in `contents/<id>`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileMeta {
    pub id: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
}

/// What a batch was created with: everything its timeline depends on.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BatchMeta {
    pub id: String,
    pub endpoint: String,
    pub input_file_id: String,
    pub completion_window: String,
    pub metadata: Value,
    pub output_ttl: Option<i64>,
    pub created: Exact,
    pub deadline: Exact,
    pub validating: Exact,
    pub per_request: Exact,
    pub finalizing: Exact,
    pub cancel: Exact,
    pub profile: Profile,
    pub models: Vec<String>,
    pub max_lines: u64,
    pub token_limit: bool,
}

/// One thing that happened. Events about a batch are written while its lock
/// is held, so they are in the order they happened.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    Format {
        version: u32,
    },
    /// An upload (outputs are recorded by [`Event::Finished`]).
    FileAdded {
        file: FileMeta,
    },
    FileDeleted {
        id: String,
    },
    BatchCreated {
        batch: BatchMeta,
    },
    /// The end of `validating`. `custom_ids` are every id seen (for the
    /// stats); `valid_lines` is `None` when the batch fails.
    Validated {
        batch: String,
        lines: u64,
        custom_ids: Vec<String>,
        model: Option<String>,
        errors: Option<Vec<Value>>,
        valid_lines: Option<usize>,
    },
    /// Good lines up to `upto` (exclusive) have run; `custom_ids` are those
    /// of the lines this step ran, in order.
    Executed {
        batch: String,
        upto: usize,
        custom_ids: Vec<String>,
    },
    Cancelled {
        batch: String,
        at: Exact,
    },
    /// A terminal status reached: the counts shown from now on and the files
    /// written (their contents are already in `contents/`).
    Finished {
        batch: String,
        completed: u64,
        failed: u64,
        prompt_tokens: u64,
        completion_tokens: u64,
        output: Option<FileMeta>,
        error: Option<FileMeta>,
    },
    /// `DELETE /v1/messages/batches/{id}` of an ended Message Batch: the
    /// batch and its result files are gone.
    BatchDeleted {
        batch: String,
        files: Vec<String>,
    },
    /// `POST /_emulator/clock`: the offset from then on.
    Clock {
        offset: Exact,
    },
}

/// A journal line: the event, the clock time it was written at (time never
/// goes back behind it after a restart) and the traffic counters then (they
/// are stats only, so they are not written on every call and may lag after a
/// crash by the calls since the last event).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Entry {
    pub at: Exact,
    pub api_calls: u64,
    pub realtime_requests: u64,
    pub event: Event,
}

/// The open journal and content directory.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    contents: PathBuf,
    /// Appends are whole lines written under this lock; the fsync that
    /// follows is made outside it, on `sync`.
    log: Mutex<File>,
    sync: File,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Makes a directory entry (a new or removed file in it) durable.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (or creates) the journal under `dir`, locks it against a second
    /// process, and returns every event in it. A half-written last line is cut
    /// off; any other unreadable line is an error.
    pub fn open(dir: &Path) -> Result<(Journal, Vec<Entry>), JournalError> {
        let contents = dir.join(CONTENTS);
        std::fs::create_dir_all(&contents).map_err(io_err(&contents))?;
        let path = dir.join(JOURNAL);
        let err = io_err(&path);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(&err)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(JournalError::InUse {
                    path: path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(err(e)),
        }
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(&err)?;
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        if complete < text.len() {
            tracing::warn!(
                path = %path.display(),
                bytes = text.len() - complete,
                "emulator journal: cutting off a half-written last line"
            );
            file.set_len(complete as u64).map_err(&err)?;
            file.sync_all().map_err(&err)?;
        }
        file.seek(SeekFrom::End(0)).map_err(&err)?;
        let mut entries = Vec::new();
        for (n, line) in text[..complete].split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let entry: Entry = serde_json::from_slice(line).map_err(|e| JournalError::Corrupt {
                path: path.display().to_string(),
                line: n + 1,
                message: e.to_string(),
            })?;
            entries.push(entry);
        }
        match entries.first().map(|e| &e.event) {
            Some(Event::Format { version }) if *version == FORMAT => {}
            Some(Event::Format { version }) => {
                return Err(JournalError::Format {
                    path: path.display().to_string(),
                    found: *version,
                });
            }
            Some(_) => {
                return Err(JournalError::Corrupt {
                    path: path.display().to_string(),
                    line: 1,
                    message: "the first line is not the format line".to_owned(),
                });
            }
            None => {}
        }
        let sync = file.try_clone().map_err(&err)?;
        let journal = Journal {
            path: path.clone(),
            contents,
            log: Mutex::new(file),
            sync,
        };
        if entries.is_empty() {
            let format = Entry {
                at: Exact(0.0),
                api_calls: 0,
                realtime_requests: 0,
                event: Event::Format { version: FORMAT },
            };
            journal
                .append(std::slice::from_ref(&format))
                .map_err(io_err(&path))?;
            sync_dir(dir).map_err(io_err(dir))?;
            entries.push(format);
        }
        Ok((journal, entries))
    }

    /// Appends `entries` and makes them durable.
    pub fn append(&self, entries: &[Entry]) -> std::io::Result<()> {
        let mut text = Vec::new();
        for entry in entries {
            serde_json::to_writer(&mut text, entry)?;
            text.push(b'\n');
        }
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(&text)?;
        self.sync.sync_data()
    }

    fn content_path(&self, id: &str) -> PathBuf {
        self.contents.join(id)
    }

    /// Writes a File's content and makes it durable, before the event that
    /// names it.
    pub fn write_content(&self, id: &str, bytes: &[u8]) -> std::io::Result<()> {
        let mut f = File::create(self.content_path(id))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        sync_dir(&self.contents)
    }

    pub fn read_content(&self, id: &str) -> Result<Bytes, JournalError> {
        let path = self.content_path(id);
        std::fs::read(&path).map(Bytes::from).map_err(io_err(&path))
    }

    /// Removes a content no File and no unfinished batch needs any more. A
    /// failure only leaves it for the next open to remove.
    pub fn remove_content(&self, id: &str) {
        if let Err(e) = std::fs::remove_file(self.content_path(id)) {
            tracing::warn!(id, error = %e, "emulator: cannot remove a file's content");
        }
    }

    /// Removes every content not in `keep` (left by a crash between writing
    /// a content and its event, or between an event and the removal).
    pub fn collect_garbage(&self, keep: &HashSet<String>) {
        let Ok(dir) = std::fs::read_dir(&self.contents) else {
            return;
        };
        for entry in dir.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| keep.contains(n)) {
                tracing::info!(content = ?name, "emulator: removing an orphaned content");
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(content = ?name, error = %e, "emulator: cannot remove an orphaned content");
                }
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: Event) -> Entry {
        Entry {
            at: Exact(1.0),
            api_calls: 0,
            realtime_requests: 0,
            event,
        }
    }

    #[test]
    fn exact_times_come_back_bit_for_bit() {
        for v in [1_764_425_202.123_456_7, 0.1 + 0.2, 1e-300, 0.0] {
            let text = serde_json::to_string(&Exact(v)).unwrap();
            let back: Exact = serde_json::from_str(&text).unwrap();
            assert_eq!(back.0.to_bits(), v.to_bits(), "{text}");
        }
        assert!(serde_json::from_str::<Exact>("\"inf\"").is_err());
    }

    #[test]
    fn reopen_returns_events_and_cuts_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, entries) = Journal::open(dir.path()).unwrap();
            assert!(matches!(
                entries[..],
                [Entry {
                    event: Event::Format { version: FORMAT },
                    ..
                }]
            ));
            j.append(&[entry(Event::FileDeleted { id: "a".into() })])
                .unwrap();
        }
        // A crash in the middle of the next append.
        let path = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"at\":\"2.0\",\"api_ca").unwrap();
        drop(f);
        let (j, entries) = Journal::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 2);
        assert!(matches!(&entries[1].event, Event::FileDeleted { id } if id == "a"));
        j.append(&[entry(Event::FileDeleted { id: "b".into() })])
            .unwrap();
        drop(j);
        let (_j, entries) = Journal::open(dir.path()).unwrap();
        assert_eq!(entries.len(), 3);
    }

    #[test]
    fn a_second_opener_and_a_bad_line_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            Journal::open(dir.path()),
            Err(JournalError::InUse { .. })
        ));
        drop(j);
        let path = dir.path().join(JOURNAL);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"not json\n").unwrap();
        drop(f);
        let err = Journal::open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn garbage_collection_keeps_what_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        j.write_content("file-keep", b"k").unwrap();
        j.write_content("file-orphan", b"o").unwrap();
        j.collect_garbage(&HashSet::from(["file-keep".to_owned()]));
        assert_eq!(&j.read_content("file-keep").unwrap()[..], b"k");
        assert!(j.read_content("file-orphan").is_err());
    }
}
