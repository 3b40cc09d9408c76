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
//! | 0x0B | `0B · partition u32 · asset_id utf-8` | fleet view: the partition's newest  |
//! |      |                                       | changelog record of the asset: 0,   |
//! |      |                                       | its deadline i64 BE (i64::MIN for   |
//! |      |                                       | none), the twin datum; or 1 and a   |
//! |      |                                       | tombstone's deletion time           |
//! | 0x0C | `0C · partition u32`                  | fleet view: checkpoints, pairs of   |
//! |      |                                       | next offset and the highest source  |
//! |      |                                       | offset before it, i64 BE each       |
//!
//! The fleet view (kinds 0x06 to 0x09, 0x0B, 0x0C) is a read replica of the whole changelog
//! for the HTTP API (see `crate::view`), apart from the owned state. The pipeline reads it
//! only to promote a partition's twins when the partition is assigned
//! ([`PartitionStore::promote`]).
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

use std::ops::Range;
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
const KIND_VIEW_INDEX: u8 = 0x0B;
const KIND_VIEW_SOURCES: u8 = 0x0C;

/// The deadline a view index entry holds for a twin without a timer.
const NO_TIMER: i64 = i64::MIN;

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

    /// Writes a batch atomically without the write-ahead log: a crash before the next
    /// [`PartitionStore::flush`] may lose it, with its positions (a restore writes this way,
    /// and flushes before the partition is processed).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn commit_unlogged(&self, batch: StoreBatch) -> Result<()> {
        let mut opts = WriteOptions::default();
        opts.disable_wal(true);
        Ok(self.db.write_opt(batch.batch, &opts)?)
    }

    /// Writes the memtables to disk, so that writes without the log are durable.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails.
    pub fn flush(&self) -> Result<()> {
        Ok(self.db.flush()?)
    }

    /// Replaces the partition's twins, timers and deletion notes by the fleet view's copy
    /// of them, as of one snapshot of the view, when the view reflects more of the
    /// changelog than the store. Deletion notes that ended by `now` (`refuse_for` after the
    /// deletion) are left out.
    ///
    /// The copy must hold only work whose input is before `resume` (where processing
    /// resumes): a crashed at-least-once owner leaves an unfinished tail, changelog records
    /// of later input, which the replay writes again. The view's checkpoints give the last
    /// changelog offset `t` before that tail; when it is before the view's position,
    /// `revert` is asked, with the changelog range from `t` to the view's position and a
    /// lookup of the versions the view keeps (asset, version), for the twin each asset
    /// changed in that range had at `t` (`None`: it had none), with its deadline; it
    /// answers `None` when it cannot tell. The copy then reflects the changelog up to `t`,
    /// and the restore goes on from there.
    ///
    /// Written in three steps, each durable: the partition's old state and changelog
    /// position go, table files with the copy are taken in, the copy's position is set; so a
    /// crash in between leaves a store that restores the whole changelog.
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails, `Error::CorruptStore` for a bad view key; what
    /// `revert` returns.
    pub fn promote(
        &self,
        resume: i64,
        now: i64,
        refuse_for: Option<i64>,
        revert: impl FnOnce(
            Range<i64>,
            &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>,
        ) -> Result<Option<Reverted>>,
    ) -> Result<std::result::Result<Promotion, NoPromotion>> {
        let snapshot = self.db.snapshot();
        let k = key(KIND_VIEW_POSITION, self.partition, b"");
        let viewed = snapshot.get(&k)?.map(|v| position(&k, &v)).transpose()?;
        let k = key(KIND_VIEW_SOURCES, self.partition, b"");
        let checkpoints = snapshot
            .get(&k)?
            .map(|v| Checkpoints::decode(&k, &v))
            .transpose()?;
        let (Some(viewed), Some(checkpoints)) = (viewed, checkpoints) else {
            return Ok(Err(NoPromotion::NotIndexed));
        };
        let Some(clean) = checkpoints.clean_before(resume) else {
            return Ok(Err(NoPromotion::UnfinishedTail));
        };
        let k = key(KIND_CHANGELOG, self.partition, b"");
        let stored = snapshot.get(&k)?.map(|v| position(&k, &v)).transpose()?;
        if stored.is_some_and(|c| c >= clean) {
            return Ok(Err(NoPromotion::StoreAhead));
        }
        let mut reverted = Reverted::new();
        if clean < viewed {
            let version = |id: &str, version: u64| -> Result<Option<Vec<u8>>> {
                Ok(snapshot.get(history_key(id, version))?)
            };
            match revert(clean..viewed, &version)? {
                Some(r) => reverted = r,
                None => return Ok(Err(NoPromotion::TailNotKept)),
            }
        }
        // First what the store had of the partition goes, with its changelog position, so
        // that a crash before the end leaves a store that restores the whole changelog. A
        // range is deleted only where it holds something: taking files in over a range
        // deletion still in the memtable costs a flush.
        let mut clear = self.batch();
        for kind in [KIND_TWIN, KIND_DEADLINE, KIND_DELETED] {
            let (from, to) = (
                key(kind, self.partition, b""),
                key(kind, self.partition + 1, b""),
            );
            let mut read = rocksdb::ReadOptions::default();
            read.set_iterate_upper_bound(to.clone());
            let mut held = self
                .db
                .iterator_opt(IteratorMode::From(&from, Direction::Forward), read);
            if held.next().transpose()?.is_some() {
                clear.batch.delete_range(from, to);
            }
        }
        clear.batch.delete(key(KIND_CHANGELOG, self.partition, b""));
        self.commit(clear)?;

        // Then the view's twins, deletion notes and timers go straight into table files in
        // key order (the index is in asset order, as the twin and note keys), which RocksDB
        // takes in whole: no memtable, no log, no flush.
        let files = Files::new(&self.db, self.partition)?;
        let (mut twin_file, mut note_file) = (files.writer(), files.writer());
        let mut timers: Vec<Vec<u8>> = Vec::new();
        let mut twins = 0u64;
        let prefix = key(KIND_VIEW_INDEX, self.partition, b"");
        let mut read = rocksdb::ReadOptions::default();
        read.set_iterate_upper_bound(key(KIND_VIEW_INDEX, self.partition + 1, b""));
        for item in snapshot.iterator_opt(IteratorMode::From(&prefix, Direction::Forward), read) {
            let (k, v) = item?;
            let id = std::str::from_utf8(&k[prefix.len()..])
                .map_err(|_| Error::CorruptStore(format!("view index key {k:?}")))?;
            let at = v
                .get(1..9)
                .map(|b| i64::from_be_bytes(b.try_into().expect("8 bytes")));
            let (twin, deadline) = match (reverted.get(id), v.first(), at) {
                (Some(None), _, _) => continue,
                (Some(Some((twin, deadline))), _, _) => (&twin[..], *deadline),
                (None, Some(0), Some(deadline)) => {
                    (&v[9..], (deadline != NO_TIMER).then_some(deadline))
                }
                (None, Some(1), Some(at)) => {
                    if let Some(refuse) = refuse_for
                        && at.saturating_add(refuse) > now
                    {
                        let note = key(KIND_DELETED, self.partition, id.as_bytes());
                        note_file.put(note, at.to_be_bytes())?;
                        timers.push(deadline_key(self.partition, at.saturating_add(refuse), id));
                    }
                    continue;
                }
                _ => return Err(Error::CorruptStore(format!("view index key {k:?}"))),
            };
            twin_file.put(key(KIND_TWIN, self.partition, id.as_bytes()), twin)?;
            if let Some(at) = deadline {
                timers.push(deadline_key(self.partition, at, id));
            }
            twins += 1;
        }
        timers.sort_unstable();
        timers.dedup();
        let mut timer_file = files.writer();
        for timer in timers {
            timer_file.put(timer, [])?;
        }
        files.ingest([twin_file, note_file, timer_file])?;

        let mut done = self.batch();
        done.set_changelog_next(clean);
        self.commit(done)?;
        Ok(Ok(Promotion {
            twins,
            reverted: reverted.len() as u64,
            changelog_next: clean,
        }))
    }
}

/// The table files a promotion writes in a directory of the database's own, and takes in.
struct Files {
    db: Arc<DB>,
    dir: std::path::PathBuf,
    options: Options,
    made: std::cell::Cell<usize>,
}

/// One table file being written: opened at its first entry (an empty file cannot be taken
/// in).
struct TableFile<'f> {
    files: &'f Files,
    writer: Option<(rocksdb::SstFileWriter<'f>, std::path::PathBuf)>,
}

impl Files {
    fn new(db: &Arc<DB>, partition: u32) -> Result<Files> {
        let dir = db.path().join(format!("promote-{partition}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::Store(format!("creating {}: {e}", dir.display())))?;
        // Uncompressed: compressing is most of the cost of writing them, and compaction
        // compresses them later, off the takeover's path.
        let mut options = Options::default();
        options.set_compression_type(rocksdb::DBCompressionType::None);
        Ok(Files {
            db: db.clone(),
            dir,
            options,
            made: std::cell::Cell::new(0),
        })
    }

    fn writer(&self) -> TableFile<'_> {
        TableFile {
            files: self,
            writer: None,
        }
    }

    /// Finishes the files that have entries and has the database take them in (moved).
    fn ingest<const N: usize>(&self, files: [TableFile<'_>; N]) -> Result<()> {
        let mut paths = Vec::new();
        for file in files {
            if let Some((mut writer, path)) = file.writer {
                writer.finish()?;
                paths.push(path);
            }
        }
        if !paths.is_empty() {
            let mut opts = rocksdb::IngestExternalFileOptions::default();
            opts.set_move_files(true);
            self.db.ingest_external_file_opts(&opts, paths)?;
        }
        Ok(())
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl TableFile<'_> {
    /// Adds an entry; keys must come in increasing order.
    fn put(&mut self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<()> {
        if self.writer.is_none() {
            let n = self.files.made.get();
            self.files.made.set(n + 1);
            let path = self.files.dir.join(format!("{n}.sst"));
            let writer = rocksdb::SstFileWriter::create(&self.files.options);
            writer.open(&path)?;
            self.writer = Some((writer, path));
        }
        let (writer, _) = self.writer.as_mut().expect("opened above");
        Ok(writer.put(key, value)?)
    }
}

/// A stored position (i64 big-endian).
fn offset(db: &DB, k: Vec<u8>) -> Result<Option<i64>> {
    db.get(&k)?.map(|v| position(&k, &v)).transpose()
}

/// The position stored under `k`.
fn position(k: &[u8], v: &[u8]) -> Result<i64> {
    let bytes: [u8; 8] = v
        .try_into()
        .map_err(|_| Error::CorruptStore(format!("position {k:?} has {} bytes", v.len())))?;
    Ok(i64::from_be_bytes(bytes))
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

/// A viewed changelog record to write.
pub struct ViewedTwin {
    /// The asset.
    pub asset_id: String,
    /// Its changelog partition.
    pub partition: i32,
    /// The twin datum; `None`: a tombstone.
    pub twin: Option<Vec<u8>>,
    /// For a twin, its timer deadline; for a tombstone, the deletion's time if the model
    /// refuses deleted ids: what a new owner of the partition files from it.
    pub timer: Option<i64>,
}

/// Where a promotion of a partition's twins from the fleet view stands.
pub struct Promotion {
    /// Twins copied.
    pub twins: u64,
    /// Of the assets, those taken back to an older version the view kept, since their
    /// newest came from an unfinished tail.
    pub reverted: u64,
    /// The changelog offset the copied twins reflect: the restore goes on from it.
    pub changelog_next: i64,
}

/// Why the fleet view cannot give a partition's twins.
#[derive(Debug, PartialEq, Eq)]
pub enum NoPromotion {
    /// The view has not read the partition, or not all of it since it began to index it.
    NotIndexed,
    /// The store reflects as much of the changelog as the view, or more.
    StoreAhead,
    /// The view applied records of input at or after where processing resumes (an
    /// unfinished tail a crashed at-least-once owner wrote, which the replay writes again),
    /// and its checkpoints do not reach back before them.
    UnfinishedTail,
    /// The twins an unfinished tail changed cannot be taken back: the view keeps no
    /// version of them from before it, or the tail deletes a twin.
    TailNotKept,
}

/// The twins of assets an unfinished tail changed, as they were before it (`None`: the
/// asset had no twin), with their deadlines.
pub type Reverted = std::collections::HashMap<String, Option<(Vec<u8>, Option<i64>)>>;

/// Records between two of the fleet view's checkpoints of a changelog partition.
const CHECKPOINT_SPACING: i64 = 1000;
/// Checkpoints kept per changelog partition: they reach at least this many times
/// [`CHECKPOINT_SPACING`] records back.
const CHECKPOINTS_KEPT: usize = 256;

/// How far the fleet view has read a changelog partition, and what input the records it
/// applied came from: `(next offset, highest source offset of the records before it)`,
/// oldest first, at least [`CHECKPOINT_SPACING`] records apart but for the last, which is
/// where the view stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoints(Vec<(i64, i64)>);

impl Checkpoints {
    /// Notes that the view read the record before `next`, from input offset `source`.
    pub fn advance(&mut self, next: i64, source: Option<i64>) {
        let highest = self
            .0
            .last()
            .map_or(-1, |(_, h)| *h)
            .max(source.unwrap_or(-1));
        let n = self.0.len();
        if n >= 2 && self.0[n - 1].0 - self.0[n - 2].0 < CHECKPOINT_SPACING {
            self.0[n - 1] = (next, highest);
        } else {
            self.0.push((next, highest));
            if self.0.len() > CHECKPOINTS_KEPT {
                self.0.remove(0);
            }
        }
    }

    /// The newest checkpoint before which every record the view applied came from input
    /// before `resume`.
    pub fn clean_before(&self, resume: i64) -> Option<i64> {
        self.0
            .iter()
            .rev()
            .find(|(_, h)| *h < resume)
            .map(|(n, _)| *n)
    }

    fn encode(&self) -> Vec<u8> {
        self.0
            .iter()
            .flat_map(|(n, h)| n.to_be_bytes().into_iter().chain(h.to_be_bytes()))
            .collect()
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<Checkpoints> {
        if v.len() % 16 != 0 {
            return Err(Error::CorruptStore(format!(
                "checkpoints {k:?} have {} bytes",
                v.len()
            )));
        }
        let number = |b: &[u8]| i64::from_be_bytes(b.try_into().expect("8 bytes"));
        Ok(Checkpoints(
            v.chunks(16)
                .map(|c| (number(&c[..8]), number(&c[8..])))
                .collect(),
        ))
    }
}

impl NoPromotion {
    /// A label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            NoPromotion::NotIndexed => "not_indexed",
            NoPromotion::StoreAhead => "store_ahead",
            NoPromotion::UnfinishedTail => "unfinished_tail",
            NoPromotion::TailNotKept => "tail_not_kept",
        }
    }
}

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

    /// The view's checkpoints of `partition`, if it has indexed the partition since its
    /// first record (see [`PartitionStore::promote`]).
    ///
    /// # Errors
    /// `Error::Store` when RocksDB fails, `Error::CorruptStore` for a bad value.
    pub fn checkpoints(&self, partition: i32) -> Result<Option<Checkpoints>> {
        let k = key(KIND_VIEW_SOURCES, partition as u32, b"");
        self.db
            .get(&k)?
            .map(|v| Checkpoints::decode(&k, &v))
            .transpose()
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
        positions: &[ViewPosition],
    ) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (viewed, version) in twins.iter().zip(versions) {
            let id = &viewed.asset_id;
            match (&viewed.twin, version) {
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
        for viewed in twins {
            let (id, partition) = (&viewed.asset_id, viewed.partition);
            let (twin_key, partition_key) = (
                view_key(KIND_VIEW_TWIN, id),
                view_key(KIND_VIEW_PARTITION, id),
            );
            // The partition's index mirrors its compacted changelog: each key's newest twin
            // (with its deadline, `NO_TIMER` for none), or a tombstone's deletion time.
            let index_key = key(KIND_VIEW_INDEX, partition as u32, id.as_bytes());
            match (&viewed.twin, viewed.timer) {
                (Some(t), timer) => {
                    batch.put(twin_key, t);
                    batch.put(partition_key, partition.to_be_bytes());
                    let mut index = Vec::with_capacity(9 + t.len());
                    index.push(0);
                    index.extend_from_slice(&timer.unwrap_or(NO_TIMER).to_be_bytes());
                    index.extend_from_slice(t);
                    batch.put(index_key, index);
                }
                (None, timer) => {
                    batch.delete(twin_key);
                    batch.delete(partition_key);
                    match timer {
                        Some(at) => batch.put(index_key, [&[1u8][..], &at.to_be_bytes()].concat()),
                        None => batch.delete(index_key),
                    }
                }
            }
        }
        for p in positions {
            let at = key(KIND_VIEW_POSITION, p.partition as u32, b"");
            batch.put(at, p.next.to_be_bytes());
            if let Some(checkpoints) = &p.checkpoints {
                let at = key(KIND_VIEW_SOURCES, p.partition as u32, b"");
                batch.put(at, checkpoints.encode());
            }
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(false);
        Ok(self.db.write_opt(batch, &opts)?)
    }
}

/// How far the fleet view has read a changelog partition, written with its twins.
pub struct ViewPosition {
    /// The changelog partition.
    pub partition: i32,
    /// The next offset to read.
    pub next: i64,
    /// Its checkpoints, when the view indexes the partition (it has since its first
    /// record).
    pub checkpoints: Option<Checkpoints>,
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

    /// Writes viewed changes as the fleet view does, read up to `next` of partition 0 with
    /// `checkpoints`.
    fn view_write(
        store: &Store,
        changes: Vec<ViewedTwin>,
        next: i64,
        checkpoints: Option<Checkpoints>,
    ) {
        let versions: Vec<_> = changes
            .iter()
            .map(|c| c.twin.as_ref().map(|t| t.len() as u64))
            .collect();
        let position = ViewPosition {
            partition: 0,
            next,
            checkpoints,
        };
        store
            .view()
            .write(&changes, &versions, 100, &[position])
            .unwrap();
    }

    fn viewed(id: &str, partition: i32, twin: Option<&str>, timer: Option<i64>) -> ViewedTwin {
        ViewedTwin {
            asset_id: id.to_owned(),
            partition,
            twin: twin.map(|t| t.as_bytes().to_vec()),
            timer,
        }
    }

    /// A view that read changelog offsets 0 to 39 of input offsets 0 to 8 (8 from 20 on).
    fn read_forty() -> Checkpoints {
        let mut c = Checkpoints::default();
        for o in 0..40 {
            c.advance(o + 1, Some(o.min(8)));
        }
        c
    }

    fn no_revert(
        _: Range<i64>,
        _: &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>,
    ) -> Result<Option<Reverted>> {
        panic!("nothing to revert")
    }

    #[test]
    fn a_partition_takes_the_fleet_views_twins_timers_and_deletion_notes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = store.partition(0);
        // What the store had of the partition from an earlier ownership.
        let mut b = p.batch();
        b.put_twin("gone", b"old");
        b.put_twin("a", b"a-old");
        b.put_deadline(5, "gone");
        b.set_changelog_next(0);
        p.commit(b).unwrap();
        assert_eq!(
            p.promote(10, 0, None, no_revert).unwrap().err(),
            Some(NoPromotion::NotIndexed)
        );

        view_write(
            &store,
            vec![
                viewed("a", 0, Some("a-1"), Some(100)),
                viewed("b", 0, Some("b-1"), None),
                viewed("moved", 0, Some("m-1"), None),
                viewed("gone", 0, None, None),
                viewed("refused", 0, None, Some(1_000)),
                viewed("expired", 0, None, Some(10)),
                viewed("other", 1, Some("o-1"), None),
                viewed("a", 0, Some("a-22"), Some(200)),
                viewed("moved", 1, Some("m-2"), None),
            ],
            40,
            Some(read_forty()),
        );
        assert_eq!(
            p.promote(0, 0, None, no_revert).unwrap().err(),
            Some(NoPromotion::UnfinishedTail),
            "every record the view applied is of input at or after 0"
        );
        let promoted = (p.promote(9, 500, Some(100), no_revert).unwrap()).expect("promoted");
        assert_eq!((promoted.twins, promoted.changelog_next), (3, 40));
        assert_eq!(p.changelog_next().unwrap(), Some(40));
        let twins: Vec<_> = p.scan(None, 10).unwrap();
        let twins: Vec<(&str, &[u8])> = twins.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        // As a restore of the partition's changelog would have them: "moved" too, whose
        // newest record in this partition is its first twin.
        assert_eq!(
            twins,
            [
                ("a", &b"a-22"[..]),
                ("b", &b"b-1"[..]),
                ("moved", &b"m-1"[..])
            ]
        );
        assert_eq!(
            p.due(None, i64::MAX, 10).unwrap(),
            [(200, "a".to_owned()), (1_100, "refused".to_owned())],
            "the newest twin's timer, and the live deletion note's end; the old entry is gone"
        );
        assert_eq!(p.deleted_at("refused").unwrap(), Some(1_000));
        assert_eq!(
            p.deleted_at("expired").unwrap(),
            None,
            "its refusal ended at 110"
        );
        assert_eq!(
            store.partition(1).twin("moved").unwrap(),
            None,
            "views are not state"
        );
        assert_eq!(
            p.promote(9, 500, Some(100), no_revert).unwrap().err(),
            Some(NoPromotion::StoreAhead)
        );
    }

    #[test]
    fn an_unfinished_tail_is_taken_back_to_the_versions_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let p = store.partition(0);
        // Versions are the twins' lengths here: "a-1" is version 3, "a-22" version 4.
        view_write(
            &store,
            vec![
                viewed("a", 0, Some("a-1"), Some(100)),
                viewed("b", 0, Some("b-1"), None),
                viewed("a", 0, Some("a-22"), Some(200)),
                viewed("new", 0, Some("n"), None),
            ],
            40,
            Some(read_forty()),
        );
        // Processing resumes at input 8: the view's records from changelog offset 20 on
        // (input 8) are an unfinished tail; its first checkpoint, offset 1, is before it.
        let cannot = |range: Range<i64>, _: &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>| {
            assert_eq!(range, 1..40);
            Ok(None)
        };
        assert_eq!(
            p.promote(8, 0, None, cannot).unwrap().err(),
            Some(NoPromotion::TailNotKept)
        );
        let revert = |_: Range<i64>, version: &dyn Fn(&str, u64) -> Result<Option<Vec<u8>>>| {
            // The range changed "a" from version 4 and created "new".
            let a = version("a", 3)?.expect("kept");
            assert_eq!(version("a", 2)?, None);
            Ok(Some(Reverted::from([
                ("a".to_owned(), Some((a, Some(100)))),
                ("new".to_owned(), None),
            ])))
        };
        let promoted = p.promote(8, 0, None, revert).unwrap().expect("promoted");
        assert_eq!(
            (promoted.twins, promoted.reverted, promoted.changelog_next),
            (2, 2, 1)
        );
        let twins: Vec<_> = p.scan(None, 10).unwrap();
        let twins: Vec<(&str, &[u8])> = twins.iter().map(|(k, v)| (k.as_str(), &v[..])).collect();
        assert_eq!(twins, [("a", &b"a-1"[..]), ("b", &b"b-1"[..])]);
        assert_eq!(p.due(None, i64::MAX, 10).unwrap(), [(100, "a".to_owned())]);
    }

    #[test]
    fn checkpoints_are_spaced_bounded_and_find_the_last_clean_one() {
        let mut c = Checkpoints::default();
        assert_eq!(c.clean_before(i64::MAX), None, "nothing read");
        for o in 0..(CHECKPOINT_SPACING * 300) {
            c.advance(o + 1, Some(o / 10));
        }
        assert_eq!(c.0.len(), CHECKPOINTS_KEPT);
        let kept = &c.0[..c.0.len() - 1];
        assert!(
            kept.windows(2)
                .all(|w| w[1].0 - w[0].0 >= CHECKPOINT_SPACING)
        );
        assert_eq!(
            c.0.last(),
            Some(&(CHECKPOINT_SPACING * 300, CHECKPOINT_SPACING * 30 - 1))
        );
        let resume = CHECKPOINT_SPACING * 29;
        let clean = c.clean_before(resume).unwrap();
        assert!(c.0.iter().all(|(n, h)| *n <= clean || *h >= resume));
        assert!(clean > resume * 10 - CHECKPOINT_SPACING * 2, "{clean}");
        assert_eq!(c.clean_before(0), None, "older than any checkpoint kept");
        let k = b"k";
        assert_eq!(Checkpoints::decode(k, &c.encode()).unwrap(), c);
        assert!(Checkpoints::decode(k, &[0; 15]).is_err());
        // A record without a source offset leaves the highest as it is.
        c.advance(CHECKPOINT_SPACING * 300 + 1, None);
        assert_eq!(c.0.last().unwrap().1, CHECKPOINT_SPACING * 30 - 1);
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
