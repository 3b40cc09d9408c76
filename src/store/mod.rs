//! The local state: twins and input positions of the assigned partitions, in one RocksDB
//! database per instance.
//!
//! Key layout (kind byte first, then big-endian fields, so keys sort as tuples):
//!
//! | kind | key                                   | value                               |
//! |------|---------------------------------------|-------------------------------------|
//! | 0x01 | `01 · partition u32 · asset_id utf-8` | twin, Avro datum of the twin schema |
//! | 0x02 | `02 · partition u32 · topic utf-8`    | next input offset to read, i64 BE   |
//! | 0x03 | `03 · partition u32`                  | next changelog offset reflected, BE |
//! | 0x04 | `04 · partition u32`                  | prepared commit: next input offset, |
//! |      |                                       | i64 BE, then the `WriteBatch` bytes |
//! | 0x05 | `05 · partition u32 · deadline i64 ·  | empty: the twin's status changes by |
//! |      |   asset_id utf-8`                     | itself at `deadline` (a timer)      |
//! | 0x06 | `06 · asset_id utf-8`                 | fleet view: the newest changelog    |
//! |      |                                       | twin of every asset, any partition  |
//! | 0x07 | `07 · partition u32`                  | fleet view: next changelog offset   |
//! | 0x08 | `08 · asset_id utf-8`                 | fleet view: the changelog partition |
//! |      |                                       | of the asset's twin, i32 BE         |
//! | 0x09 | `09 · asset_id length u16 · asset_id  | fleet view: a version of the twin   |
//! |      |   utf-8 · version u64`                | (twin datum), the newest N kept     |
//! | 0x0A | `0A · partition u32 · asset_id utf-8` | the twin was deleted at this        |
//! |      |                                       | processing time, i64 BE: readings   |
//! |      |                                       | of it are refused for a while       |
//!
//! The fleet view (kinds 0x06 to 0x09) is a read replica of the whole changelog for the HTTP
//! API (see `crate::view`), apart from the owned state: nothing in the pipeline reads it.
//!
//! Kind bytes are never reused; retired kinds stay listed here.
//!
//! Invariant: twins and the positions of a commit land in one `WriteBatch`, so after any
//! crash the stored twins are exactly those implied by the stored positions: the input
//! offset says where processing resumes, the changelog offset where a restore resumes.
//! Under exactly-once a commit is first *prepared* (its batch stored aside, in one write),
//! then the Kafka transaction commits, then the batch is applied; a crash in between leaves
//! the prepared batch, which [`PartitionStore::resolve_prepared`] applies only if the group
//! offset shows that its transaction committed.
//! Writes skip fsync: a machine crash may lose the newest commits, and their positions with
//! them, so replay and restore recompute them.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{DB, Direction, IteratorMode, Options, WriteBatch, WriteOptions};

use crate::error::{Error, Result};

const KIND_TWIN: u8 = 0x01;
const KIND_OFFSET: u8 = 0x02;
const KIND_CHANGELOG: u8 = 0x03;
const KIND_PREPARED: u8 = 0x04;
const KIND_DEADLINE: u8 = 0x05;
const KIND_VIEW_TWIN: u8 = 0x06;
const KIND_VIEW_POSITION: u8 = 0x07;
const KIND_VIEW_PARTITION: u8 = 0x08;
const KIND_VIEW_HISTORY: u8 = 0x09;
const KIND_DELETED: u8 = 0x0A;

/// A twin's versions are trimmed to the kept number once every this many versions (one
/// range delete each time, not one per version).
const HISTORY_TRIM_EVERY: u64 = 64;

/// The instance's RocksDB database.
#[derive(Clone)]
pub struct Store {
    db: Arc<DB>,
}

impl Store {
    /// Opens (or creates) the database at `path`.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB cannot open it, for example because another process holds
    /// its lock.
    pub fn open(path: &Path) -> Result<Store> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.increase_parallelism(2);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&block);
        let db = DB::open(&opts, path).map_err(|e| {
            Error::Store(format!("opening {}: {}", path.display(), e.into_string()))
        })?;
        Ok(Store { db: Arc::new(db) })
    }

    /// The view of one input partition's state.
    pub fn partition(&self, partition: i32) -> PartitionStore {
        PartitionStore {
            db: self.db.clone(),
            partition: partition as u32,
        }
    }

    /// The fleet view: the read replica of the whole changelog.
    pub fn view(&self) -> ViewStore {
        ViewStore {
            db: self.db.clone(),
        }
    }

    /// Writes the memtables to disk and waits, so that the next open has no write-ahead
    /// log to replay.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn flush(&self) -> Result<()> {
        Ok(self.db.flush()?)
    }

    /// Approximate size of the live data on disk, in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.db
            .property_int_value("rocksdb.live-sst-files-size")
            .ok()
            .flatten()
            .unwrap_or(0)
            + self
                .db
                .property_int_value("rocksdb.cur-size-all-mem-tables")
                .ok()
                .flatten()
                .unwrap_or(0)
    }
}

/// One partition's twins and input position.
#[derive(Clone)]
pub struct PartitionStore {
    db: Arc<DB>,
    partition: u32,
}

fn key(kind: u8, partition: u32, tail: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + tail.len());
    key_into(&mut k, kind, partition, tail);
    k
}

/// Builds a key in `k`, reusing its memory.
fn key_into(k: &mut Vec<u8>, kind: u8, partition: u32, tail: &[u8]) {
    k.clear();
    k.push(kind);
    k.extend_from_slice(&partition.to_be_bytes());
    k.extend_from_slice(tail);
}

/// Deadlines are processing times (positive), so big-endian bytes sort in time order.
fn deadline_key(partition: u32, deadline: i64, asset_id: &str) -> Vec<u8> {
    let mut tail = Vec::with_capacity(8 + asset_id.len());
    tail.extend_from_slice(&deadline.max(0).to_be_bytes());
    tail.extend_from_slice(asset_id.as_bytes());
    key(KIND_DEADLINE, partition, &tail)
}

impl PartitionStore {
    /// The partition number.
    pub fn partition(&self) -> i32 {
        self.partition as i32
    }

    /// The stored twin of `asset_id`, as written by `Codec::encode_twin`.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn twin(&self, asset_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self
            .db
            .get(key(KIND_TWIN, self.partition, asset_id.as_bytes()))?)
    }

    /// When the twin of `asset_id` was deleted, while its id is refused
    /// (`[lifecycle] refuse_deleted_for`).
    ///
    /// # Errors
    /// As [`PartitionStore::next_offset`].
    pub fn deleted_at(&self, asset_id: &str) -> Result<Option<i64>> {
        self.offset(key(KIND_DELETED, self.partition, asset_id.as_bytes()))
    }

    /// The next offset of `topic` to read: everything before it is applied.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails; `Error::CorruptStore` for a malformed value.
    pub fn next_offset(&self, topic: &str) -> Result<Option<i64>> {
        self.offset(key(KIND_OFFSET, self.partition, topic.as_bytes()))
    }

    /// The next changelog offset to restore from: every changelog record before it is
    /// reflected in the stored twins.
    ///
    /// # Errors
    /// As [`PartitionStore::next_offset`].
    pub fn changelog_next(&self) -> Result<Option<i64>> {
        self.offset(key(KIND_CHANGELOG, self.partition, b""))
    }

    fn offset(&self, k: Vec<u8>) -> Result<Option<i64>> {
        offset(&self.db, k)
    }

    /// Up to `limit` twins whose asset id sorts after `after`, in asset id order.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        scan(&self.db, &key(KIND_TWIN, self.partition, b""), after, limit)
    }

    /// Up to `limit` timers due at `now`: `(deadline, asset_id)`, earliest first. The index
    /// is ordered by deadline, so this reads only what is due.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    /// Starts after `after` (a timer already looked at): fired timers leave deletion markers
    /// behind until RocksDB compacts them away, and reading past them on every look would
    /// cost as much as the timers fired so far.
    pub fn due(
        &self,
        after: Option<&(i64, String)>,
        now: i64,
        limit: usize,
    ) -> Result<Vec<(i64, String)>> {
        let prefix = key(KIND_DEADLINE, self.partition, b"");
        let start = after.map_or_else(
            || prefix.clone(),
            |(d, id)| deadline_key(self.partition, *d, id),
        );
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&start, Direction::Forward))
        {
            let (k, _) = item?;
            if after.is_some() && *k == *start {
                continue;
            }
            if !k.starts_with(&prefix) || out.len() == limit || k.len() < prefix.len() + 8 {
                break;
            }
            let at = &k[prefix.len()..];
            let deadline = i64::from_be_bytes(at[..8].try_into().expect("8 bytes"));
            if deadline > now {
                break;
            }
            out.push((deadline, String::from_utf8_lossy(&at[8..]).into_owned()));
        }
        Ok(out)
    }

    /// Number of twins stored for this partition (a full scan: for tests and tools).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn count(&self) -> Result<usize> {
        let prefix = key(KIND_TWIN, self.partition, b"");
        let mut n = 0;
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// A batch to fill with twins and a position.
    pub fn batch(&self) -> StoreBatch {
        StoreBatch {
            batch: WriteBatch::default(),
            partition: self.partition,
            key: Vec::new(),
        }
    }

    /// Stores `batch` aside as the prepared commit that moves the input position to `next`,
    /// replacing any earlier one. Apply it with [`PartitionStore::commit`] once Kafka has
    /// committed (the batch then also removes the prepared copy).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn prepare(&self, next: i64, batch: &mut StoreBatch) -> Result<()> {
        let k = key(KIND_PREPARED, self.partition, b"");
        batch.batch.delete(&k);
        let data = batch.batch.data();
        let mut value = Vec::with_capacity(8 + data.len());
        value.extend_from_slice(&next.to_be_bytes());
        value.extend_from_slice(data);
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.put_opt(k, value, &opts)?)
    }

    /// Settles a prepared commit left by a crash: applies it if `committed` (the group's
    /// committed input offset) is the position it moves to, which means its transaction
    /// committed; drops it otherwise. Returns whether one was applied.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails; `Error::CorruptStore` for a malformed value.
    pub fn resolve_prepared(&self, committed: Option<i64>) -> Result<bool> {
        let k = key(KIND_PREPARED, self.partition, b"");
        let Some(value) = self.db.get(&k)? else {
            return Ok(false);
        };
        let next = value
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .map(i64::from_be_bytes)
            .ok_or_else(|| Error::CorruptStore(format!("prepared commit {k:?} is truncated")))?;
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        if committed == Some(next) {
            // The batch deletes the prepared copy itself.
            self.db
                .write_opt(WriteBatch::from_data(&value[8..]), &opts)?;
            Ok(true)
        } else {
            self.db.delete_opt(k, &opts)?;
            Ok(false)
        }
    }

    /// Drops the prepared commit, if any (its transaction was aborted).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn discard_prepared(&self) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self
            .db
            .delete_opt(key(KIND_PREPARED, self.partition, b""), &opts)?)
    }

    /// Writes a batch atomically (without fsync; see the module doc).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn commit(&self, batch: StoreBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.write_opt(batch.batch, &opts)?)
    }
}

/// A stored position (i64 big-endian).
fn offset(db: &DB, k: Vec<u8>) -> Result<Option<i64>> {
    match db.get(&k)? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 8] = v.as_slice().try_into().map_err(|_| {
                Error::CorruptStore(format!("position {k:?} has {} bytes", v.len()))
            })?;
            Ok(Some(i64::from_be_bytes(bytes)))
        }
    }
}

/// Up to `limit` entries under `prefix` whose id (the rest of the key) sorts after `after`.
fn scan(
    db: &DB,
    prefix: &[u8],
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<(String, Vec<u8>)>> {
    let mut start = prefix.to_vec();
    start.extend_from_slice(after.unwrap_or("").as_bytes());
    let mut out = Vec::new();
    for item in db.iterator(IteratorMode::From(&start, Direction::Forward)) {
        let (k, v) = item?;
        if !k.starts_with(prefix) || out.len() == limit {
            break;
        }
        let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        if after == Some(id.as_str()) {
            continue;
        }
        out.push((id, v.into_vec()));
    }
    Ok(out)
}

/// The fleet view's keys: the newest changelog twin of every asset, and how far each
/// changelog partition has been read.
#[derive(Clone)]
pub struct ViewStore {
    db: Arc<DB>,
}

fn view_key(kind: u8, asset_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + asset_id.len());
    k.push(kind);
    k.extend_from_slice(asset_id.as_bytes());
    k
}

/// A viewed twin to write: the asset, its changelog partition, and the twin (`None`: a
/// tombstone).
pub type ViewedTwin = (String, i32, Option<Vec<u8>>);

/// The history key of `version` of `asset_id` (an id is at most 512 bytes, so its length
/// fits the u16 that keeps one asset's versions apart from another's).
fn history_key(asset_id: &str, version: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(11 + asset_id.len());
    k.push(KIND_VIEW_HISTORY);
    k.extend_from_slice(&(asset_id.len().min(usize::from(u16::MAX)) as u16).to_be_bytes());
    k.extend_from_slice(asset_id.as_bytes());
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl ViewStore {
    /// The viewed twin of `asset_id` (a plain twin datum).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn twin(&self, asset_id: &str) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(view_key(KIND_VIEW_TWIN, asset_id))?)
    }

    /// The changelog partition of the viewed twin of `asset_id`: the partition of the
    /// telemetry, acknowledgements and desired writes of the asset. `None` for a twin the
    /// view has not seen change since it began to record partitions.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn partition(&self, asset_id: &str) -> Result<Option<i32>> {
        let value = self.db.get(view_key(KIND_VIEW_PARTITION, asset_id))?;
        Ok(value.and_then(|v| Some(i32::from_be_bytes(v.as_slice().try_into().ok()?))))
    }

    /// Up to `limit` viewed twins whose asset id sorts after `after`, in asset id order.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn scan(&self, after: Option<&str>, limit: usize) -> Result<Vec<(String, Vec<u8>)>> {
        scan(&self.db, &[KIND_VIEW_TWIN], after, limit)
    }

    /// The next changelog offset of `partition` the view has not read.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn position(&self, partition: i32) -> Result<Option<i64>> {
        offset(&self.db, key(KIND_VIEW_POSITION, partition as u32, b""))
    }

    /// Versions of `asset_id`'s twin from `start` (inclusive; `None`: the oldest, or the
    /// newest when `descending`), in version order or its reverse, as `(version, twin)`.
    pub fn history(
        &self,
        asset_id: &str,
        start: Option<u64>,
        descending: bool,
    ) -> impl Iterator<Item = Result<(u64, Vec<u8>)>> + '_ {
        let prefix = history_key(asset_id, 0);
        let prefix = prefix[..prefix.len() - 8].to_vec();
        let from = match (start, descending) {
            (Some(v), _) => history_key(asset_id, v),
            (None, false) => history_key(asset_id, 0),
            (None, true) => history_key(asset_id, u64::MAX),
        };
        let direction = if descending {
            Direction::Reverse
        } else {
            Direction::Forward
        };
        self.db
            .iterator(IteratorMode::From(&from, direction))
            .map(|item| item.map_err(Error::from))
            .take_while(move |item| {
                item.as_ref().map_or(true, |(k, _)| {
                    k.len() == prefix.len() + 8 && k.starts_with(&prefix)
                })
            })
            .map(|item| {
                let (k, v) = item?;
                let version = u64::from_be_bytes(k[k.len() - 8..].try_into().expect("8 bytes"));
                Ok((version, v.into_vec()))
            })
    }

    /// Writes twins (`None`: a tombstone, which also removes the asset's history) and read
    /// positions at once; `versions` holds the version of each twin to keep in its history
    /// (`None`: none), of which the newest `keep` stay.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn write(
        &self,
        twins: &[ViewedTwin],
        versions: &[Option<u64>],
        keep: u64,
        positions: &[(i32, i64)],
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        for ((id, _, twin), version) in twins.iter().zip(versions) {
            match (twin, version) {
                (Some(t), Some(v)) if keep > 0 => {
                    batch.put(history_key(id, *v), t);
                    if v % HISTORY_TRIM_EVERY == 0 && *v > keep {
                        batch.delete_range(history_key(id, 0), history_key(id, v - keep + 1));
                    }
                }
                (None, _) => batch.delete_range(history_key(id, 0), history_key(id, u64::MAX)),
                _ => {}
            }
        }
        for (id, partition, twin) in twins {
            let (twin_key, partition_key) = (
                view_key(KIND_VIEW_TWIN, id),
                view_key(KIND_VIEW_PARTITION, id),
            );
            match twin {
                Some(t) => {
                    batch.put(twin_key, t);
                    batch.put(partition_key, partition.to_be_bytes());
                }
                None => {
                    batch.delete(twin_key);
                    batch.delete(partition_key);
                }
            }
        }
        for (p, next) in positions {
            batch.put(key(KIND_VIEW_POSITION, *p as u32, b""), next.to_be_bytes());
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.write_opt(batch, &opts)?)
    }
}

/// Twins and a position to write together.
pub struct StoreBatch {
    batch: WriteBatch,
    partition: u32,
    /// The last twin key built, reused: a twin is written for almost every reading.
    key: Vec<u8>,
}

impl StoreBatch {
    /// Stores a twin (bytes from `Codec::encode_twin`).
    pub fn put_twin(&mut self, asset_id: &str, twin: &[u8]) {
        key_into(
            &mut self.key,
            KIND_TWIN,
            self.partition,
            asset_id.as_bytes(),
        );
        self.batch.put(&self.key, twin);
    }

    /// Removes a twin (a changelog tombstone).
    pub fn delete_twin(&mut self, asset_id: &str) {
        self.batch
            .delete(key(KIND_TWIN, self.partition, asset_id.as_bytes()));
    }

    /// Notes that the twin of `asset_id` was deleted at processing time `at`.
    pub fn put_deleted(&mut self, asset_id: &str, at: i64) {
        self.batch.put(
            key(KIND_DELETED, self.partition, asset_id.as_bytes()),
            at.to_be_bytes(),
        );
    }

    /// Forgets that the twin of `asset_id` was deleted.
    pub fn delete_deleted(&mut self, asset_id: &str) {
        self.batch
            .delete(key(KIND_DELETED, self.partition, asset_id.as_bytes()));
    }

    /// Sets a timer: the twin of `asset_id` changes by itself at `deadline`.
    pub fn put_deadline(&mut self, deadline: i64, asset_id: &str) {
        self.batch
            .put(deadline_key(self.partition, deadline, asset_id), []);
    }

    /// Removes a timer.
    pub fn delete_deadline(&mut self, deadline: i64, asset_id: &str) {
        self.batch
            .delete(deadline_key(self.partition, deadline, asset_id));
    }

    /// Records that every changelog record before `next` is reflected in the twins.
    pub fn set_changelog_next(&mut self, next: i64) {
        self.batch
            .put(key(KIND_CHANGELOG, self.partition, b""), next.to_be_bytes());
    }

    /// Records that every offset of `topic` before `next` is applied.
    pub fn set_next_offset(&mut self, topic: &str, next: i64) {
        self.batch.put(
            key(KIND_OFFSET, self.partition, topic.as_bytes()),
            next.to_be_bytes(),
        );
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.batch.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.batch.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn twins_and_position_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            let p = store.partition(3);
            let mut b = p.batch();
            b.put_twin("truck-1", b"one");
            b.put_twin("truck-2", b"two");
            b.set_next_offset("telemetry", 42);
            b.set_changelog_next(7);
            p.commit(b).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let p = store.partition(3);
        assert_eq!(p.twin("truck-1").unwrap().as_deref(), Some(&b"one"[..]));
        assert_eq!(p.next_offset("telemetry").unwrap(), Some(42));
        assert_eq!(p.changelog_next().unwrap(), Some(7));
        assert_eq!(p.count().unwrap(), 2);
        assert_eq!(
            store.partition(2).twin("truck-1").unwrap(),
            None,
            "partitions are separate"
        );
        assert_eq!(store.partition(4).next_offset("telemetry").unwrap(), None);
    }

    #[test]
    fn a_prepared_commit_applies_only_if_its_offset_was_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = store.partition(0);
        let prepare = |twin: &[u8], next| {
            let mut b = p.batch();
            b.put_twin("truck-1", twin);
            b.set_next_offset("telemetry", next);
            p.prepare(next, &mut b).unwrap();
        };
        prepare(b"aborted", 10);
        assert!(
            !p.resolve_prepared(Some(4)).unwrap(),
            "the group is still at 4"
        );
        assert_eq!(p.twin("truck-1").unwrap(), None);
        assert!(!p.resolve_prepared(Some(10)).unwrap(), "dropped before");

        prepare(b"committed", 10);
        assert!(p.resolve_prepared(Some(10)).unwrap());
        assert_eq!(
            p.twin("truck-1").unwrap().as_deref(),
            Some(&b"committed"[..])
        );
        assert_eq!(p.next_offset("telemetry").unwrap(), Some(10));
        assert!(!p.resolve_prepared(Some(10)).unwrap(), "applied once");

        // The normal path: prepare, then commit the same batch, which clears the copy.
        let mut b = p.batch();
        b.put_twin("truck-1", b"next");
        p.prepare(20, &mut b).unwrap();
        p.commit(b).unwrap();
        assert!(!p.resolve_prepared(Some(20)).unwrap());
        assert_eq!(p.twin("truck-1").unwrap().as_deref(), Some(&b"next"[..]));
    }

    #[test]
    fn scan_pages_in_asset_order_within_the_partition() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for part in [1, 2] {
            let p = store.partition(part);
            let mut b = p.batch();
            for id in ["c", "a", "b", "d"] {
                b.put_twin(&format!("{id}{part}"), id.as_bytes());
            }
            p.commit(b).unwrap();
        }
        let p = store.partition(1);
        let first: Vec<_> = p
            .scan(None, 2)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(first, ["a1", "b1"]);
        let next: Vec<_> = p
            .scan(Some("b1"), 10)
            .unwrap()
            .into_iter()
            .map(|(id, _)| id)
            .collect();
        assert_eq!(next, ["c1", "d1"]);
    }

    #[test]
    fn a_second_open_of_the_same_directory_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("lock held")
            .to_string();
        assert!(err.contains("lock"), "{err}");
    }
}
