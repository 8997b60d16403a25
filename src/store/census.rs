//! What the store holds, by kind of data: rows and bytes, for the
//! `ferry_storage_rows{kind}` and `ferry_storage_kind_bytes{kind}` gauges.
//! sled keeps no counts, so its census walks every tree in bounded chunks
//! (see [`crate::retention::census_loop`]); PostgreSQL's statistics give
//! the same at once.

/// The kinds of data, each one sled tree or PostgreSQL table.
pub const KINDS: [Kind; 7] = [
    Kind::Request,
    Kind::Body,
    Kind::Result,
    Kind::Batch,
    Kind::Member,
    Kind::Webhook,
    Kind::Queue,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Request,
    Body,
    Result,
    Batch,
    Member,
    Webhook,
    Queue,
}

impl Kind {
    /// The metrics' `kind` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Request => "request",
            Kind::Body => "body",
            Kind::Result => "result",
            Kind::Batch => "batch",
            Kind::Member => "member",
            Kind::Webhook => "webhook",
            Kind::Queue => "queue",
        }
    }

    /// The PostgreSQL table it lives in (the sled tree has the same name).
    pub fn table(self) -> &'static str {
        match self {
            Kind::Request => "requests",
            Kind::Body => "bodies",
            Kind::Result => "results",
            Kind::Batch => "batches",
            Kind::Member => "members",
            Kind::Webhook => "outbox",
            Kind::Queue => "queue",
        }
    }
}

/// Rows and bytes of one kind. sled: entries and their keys' and values'
/// bytes; PostgreSQL: live rows (the statistics' estimate) and the table's
/// size on disk with its indexes and TOAST.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub rows: u64,
    pub bytes: u64,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.rows += other.rows;
        self.bytes += other.bytes;
    }
}
