//! The write-ahead journal in front of sled: what makes a write durable.
//!
//! sled 0.34 makes writes durable with `Db::flush`, which hands every I/O
//! buffer to a thread pool that wakes all of its threads for each task;
//! flushing once per group commit cost about half of the coordinator's CPU
//! (BENCHMARKS.md). So the sled store keeps sled as its database (reads,
//! ranges, recovery scans) but acknowledges a write once it is in this
//! journal instead:
//!
//! 1. A writer encodes its change (every key it sets or removes) into one
//!    journal frame, a [`Write`], and queues it ([`Journal::submit`]).
//! 2. One flusher thread takes everything queued, appends the frames to the
//!    journal file with one `write`, and `fdatasync`s it (group commit: N
//!    concurrent writers share one sync).
//! 3. Only then does it apply the frames to sled, in journal order, key by
//!    key, and answer the writers. sled therefore never holds a change the
//!    journal does not, and a reader after an acknowledgement sees the
//!    change. (Not `apply_batch`: it takes sled's global write lock, which
//!    waits for a running `Db::flush`, and would stall every writer during
//!    a checkpoint.)
//! 4. Every [`CHECKPOINT_EVERY`] or [`CHECKPOINT_BYTES`] the flusher starts
//!    a new journal file (generation N+1) and hands file N, all of it
//!    applied, to the checkpoint thread, which runs `Db::flush` (after which
//!    sled holds everything in file N) and retires the file: it becomes the
//!    spare ([`SPARE_NAME`]) that the next rotation renames and overwrites
//!    from its start, so that syncs do not have to update the file size.
//!    Writers never wait for a checkpoint. A clean close checkpoints
//!    everything.
//!
//! **Recovery** ([`Journal::open`]) replays every journal file into sled,
//! oldest first, before anything reads, flushes sled, and removes them.
//! Replay is idempotent and order is all it needs: whatever subset of the
//! applied operations sled recovers on its own, they all come from journal
//! files not yet removed (a file is removed only after the flush that made
//! it redundant), every operation sets or removes a whole key, so replaying
//! those files in order ends at exactly the journal's state.
//!
//! **Frames** are `len: u32 LE | crc32(generation, group, payload): u32 LE
//! | group: u64 LE | payload`, where `group` is the file offset at which the
//! frame's group (one `write` and one sync) starts, and the payload a list
//! of operations `1 | key_len: u32 | key | value_len: u32 | value` (insert)
//! or `2 | key_len: u32 | key` (remove). A file's frames end at the first
//! frame that is incomplete or fails its checksum: past it lies an
//! interrupted write (never acknowledged) or what a recycled file held
//! before, whose frames carry an older generation in their checksum.
//! Generations only grow within a run, and a spare left by an earlier run
//! is deleted at open, so an old frame never passes.
//!
//! **Damage is found, never taken for an end.** An interrupted write is the
//! last group of the last file, and after a power loss it may have holes
//! (its pages reach the disk in any order), so valid frames of *that* group
//! may follow a bad one. Any other valid frame after a bad one, one whose
//! group starts after the bad frame, was synced after it: the bad frame was
//! acknowledged, and opening fails ([`Error::Corrupt`]) naming the file, the
//! byte, and what `--salvage-journal` would drop. Replay looks for such a
//! frame at every offset after a bad one. A rotation starts the next file
//! with a seal frame (`3 | end: u64`), synced before anything else: where
//! the previous file's frames end, so damage to the last frames of a file
//! that has a successor is found too (a file made at open has a seal too,
//! with no previous end). Every file is created at least `file_bytes` long
//! (sparse, [`FILE_BYTES`]) and synced before it is used, so a shorter file
//! was truncated; generations are consecutive and the first one follows
//! sled's checkpoint marker, so a missing file between two is seen.
//!
//! **The newest file is recorded.** Once a new file and its seal are
//! synced, and before any write goes to it, its generation is recorded in
//! [`HEAD_FILE`] (written aside, synced, renamed). At open every generation
//! after sled's marker up to the recorded one must exist, so deleting the
//! newest or only journal file is damage, not an empty journal; and every
//! file up to the recorded one must start with its own seal, so a file
//! replaced by another (two files swapped, an older copy) is damage too,
//! since frames carry their generation in their checksum. A file past the
//! record is a creation a crash interrupted: it holds no acknowledged
//! write.
//! What cannot be told from an interrupted write is damage to the very
//! last synced group of the last file when nothing follows it. Files of the first format (`tcc-journal-*`, an 8-byte header
//! without `group`), left by an older version, are replayed with the rule
//! of that version (a bad frame is damage if a valid one follows it
//! directly).
//!
//! **Checkpoints are recorded twice.** Before a checkpoint's `Db::flush`,
//! the flusher sets a marker key in sled's default tree to the generation
//! whose frames are all applied (after them, in apply order); once the
//! flush is done, the checkpointer writes that generation to
//! [`CHECKPOINT_FILE`]. sled recovers a prefix of what it applied, so the
//! marker it holds is at least the recorded generation, unless sled lost
//! writes it had made durable (its `db` cut short, or replaced by an older
//! copy): then opening fails. Generations never start again (the next one
//! is past the marker and the file), so an old marker cannot pass.
//!
//! **Salvage.** With `salvage` ([`Journal::open_salvaging`]), a damaged
//! journal is replayed up to the damage; the damaged file and every later
//! one are moved aside (renamed `*.damaged`), never deleted.
//!
//! **Conditions.** A write may carry conditions ([`Write::require`]): the
//! version stored under a key must be a given one. The flusher checks them
//! against sled and the writes before it in the same group, just before it
//! writes the group; a write whose condition fails is not written and its
//! writer gets the store's conflict error, with the group's answers (so
//! it never hears of a winner that is not durable yet). One thread checks and writes in
//! order, so conditional writes cost no lock, no extra read round and no
//! extra sync; conditions are not part of the frame (replay needs none).
//!
//! **Fail-stop.** If a journal write, sync or sled apply fails, the store is
//! poisoned: the failing writes and every later call get UNAVAILABLE, since
//! nothing after a failed sync can be promised durable. Restart recovers.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::error::{Error, Result};
use crate::lock;

/// Journal files in the data directory are named this plus a generation.
pub const FILE_PREFIX: &str = "tcc-wal-";

/// Journal files of the first format, written by older versions: replayed
/// at open, never written.
pub const LEGACY_PREFIX: &str = "tcc-journal-";

/// A checkpointed journal file kept for reuse by the next rotation:
/// overwriting allocated blocks lets `fdatasync` skip the inode update an
/// append needs, which halves its latency on ext4.
pub const SPARE_NAME: &str = "tcc-wal.spare";

/// The spare of the first format, removed at open.
const LEGACY_SPARE: &str = "tcc-journal.spare";

/// How long a rotation put off for want of file descriptors waits.
const ROTATION_RETRY: Duration = Duration::from_millis(500);

/// The generation of the last completed checkpoint (see the module docs).
pub const CHECKPOINT_FILE: &str = "tcc-checkpoint";

/// The key of the checkpoint marker in sled's default tree.
const MARKER: &[u8] = b"tcc-checkpoint";

/// Where a new journal file is prepared before it gets its name.
const NEW_NAME: &str = "tcc-wal.new";

/// The newest journal generation created (see the module docs): every
/// file from the checkpoint marker's generation on up to this one must
/// exist at open.
pub const HEAD_FILE: &str = "tcc-wal.head";

/// The `end` of the seal that starts a file made at open: there is no
/// previous file whose end it records.
const NO_PREVIOUS: u64 = u64::MAX;

/// Empty the journal into sled at least this often while writes come in,
/// which bounds the replay work at start-up.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// ... or once the journal holds this many bytes.
pub const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

/// Every journal file is created this long (sparse: no space is written),
/// so that a shorter one is known to be truncated.
pub const FILE_BYTES: u64 = CHECKPOINT_BYTES;

/// The frame header: length, checksum, group offset.
const HEADER: usize = 16;

/// The two file formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// `tcc-wal-*`: 16-byte header with the group offset.
    Grouped,
    /// `tcc-journal-*`: 8-byte header, no group offset.
    Legacy,
}

impl Format {
    fn header(self) -> usize {
        match self {
            Format::Grouped => HEADER,
            Format::Legacy => 8,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Format::Grouped => FILE_PREFIX,
            Format::Legacy => LEGACY_PREFIX,
        }
    }
}
const OP_INSERT: u8 = 1;
const OP_REMOVE: u8 = 2;
/// The first frame of a file made by a rotation: where the previous file's
/// frames end (`3 | end: u64 LE`).
const OP_SEAL: u8 = 3;

/// Runs on the flusher thread once a write is applied, before its writer
/// is answered.
pub type AfterApply = Box<dyn FnOnce() + Send>;

/// One atomic change, encoded as a journal frame.
pub struct Write {
    frame: Vec<u8>,
    conditions: Vec<Condition>,
    after: Option<AfterApply>,
}

/// The version stored under `key` must be `expected` (0 = absent); the
/// write leaves it at `next` (0 = removed).
struct Condition {
    key: Vec<u8>,
    expected: u64,
    next: u64,
}

impl Default for Write {
    fn default() -> Self {
        Write { frame: vec![0; HEADER], conditions: Vec::new(), after: None }
    }
}

/// How the journal reads conditions: the version a stored value carries
/// (0 for none), and the error for a failed condition.
#[derive(Clone, Copy)]
pub struct Versioning {
    /// The version encoded in a stored value.
    pub version_of: fn(&[u8]) -> u64,
    /// The error a writer gets when the version under `key` is `found`,
    /// not `expected`.
    pub conflict: fn(key: &[u8], expected: u64, found: u64) -> Error,
}

impl Write {
    /// Sets `key` to `value`.
    pub fn insert(&mut self, key: &[u8], value: &[u8]) {
        self.frame.push(OP_INSERT);
        put_bytes(&mut self.frame, key);
        put_bytes(&mut self.frame, value);
    }

    /// Removes `key` (absent is fine).
    pub fn remove(&mut self, key: &[u8]) {
        self.frame.push(OP_REMOVE);
        put_bytes(&mut self.frame, key);
    }

    /// Writes only if the version stored under `key` is `expected` (0 =
    /// absent) at the time of the write; `next` is the version this write
    /// leaves there (0 = removed).
    pub fn require(&mut self, key: &[u8], expected: u64, next: u64) {
        self.conditions.push(Condition { key: key.to_vec(), expected, next });
    }

    /// Runs `f` on the flusher thread once this write is durable and
    /// applied, before anyone is answered: in journal order, and whether or
    /// not the writer still waits for the answer. The store keeps its
    /// index with it.
    pub fn after_apply(&mut self, f: AfterApply) {
        self.after = Some(f);
    }

    /// Fills in the length; the checksum needs the generation of the file
    /// the frame goes to, which only the flusher knows ([`stamp`]).
    fn seal(mut self) -> Result<Sealed> {
        let len = u32::try_from(self.frame.len() - HEADER)
            .map_err(|_| Error::Storage("a single write is larger than 4 GiB".into()))?;
        self.frame[..4].copy_from_slice(&len.to_le_bytes());
        Ok(Sealed { frame: self.frame, conditions: self.conditions, after: self.after })
    }
}

/// The checksum of a frame in the journal file of `generation`, in the
/// group starting at `group` (`None` in the legacy format). Covering the
/// generation makes frames left over from a recycled file's previous use
/// fail it.
fn checksum(generation: u64, group: Option<u64>, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    if let Some(group) = group {
        h.update(&group.to_le_bytes());
    }
    h.update(payload);
    h.finalize()
}

/// Sets a sealed frame's group offset and checksum for the file of
/// `generation`.
fn stamp(frame: &mut [u8], generation: u64, group: u64) {
    frame[8..HEADER].copy_from_slice(&group.to_le_bytes());
    let crc = checksum(generation, Some(group), &frame[HEADER..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    // Keys and values are bounded far below 4 GiB by the request limits;
    // `seal` refuses a frame that is not.
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A submitted write; await [`Pending::durable`] for its outcome.
pub struct Pending(oneshot::Receiver<Result<()>>);

impl Pending {
    /// Returns once the write is in the journal on disk and applied to sled.
    pub async fn durable(self) -> Result<()> {
        self.0.await.map_err(|_| Error::Unavailable("the store is closed".into()))?
    }
}

/// When to rotate, and how long files are made (tests use small ones).
#[derive(Clone, Copy, Debug)]
struct Sizes {
    /// Checkpoint once the current file holds this many bytes.
    checkpoint: u64,
    /// Create files this long.
    file: u64,
}

impl Default for Sizes {
    fn default() -> Self {
        Sizes { checkpoint: CHECKPOINT_BYTES, file: FILE_BYTES }
    }
}

/// The journal and its two threads. See the module docs.
pub struct Journal {
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    failed: AtomicBool,
    /// The cause of the failure, once there is one (for health checks).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// A checkpoint is running; the flusher does not start another.
    checkpointing: AtomicBool,
}

#[derive(Default)]
struct Queue {
    entries: Vec<Entry>,
    /// Set by `Drop`: write what is queued, checkpoint and exit.
    stop: bool,
    /// Why the store stopped taking writes.
    failed: Option<String>,
}

/// A write as queued: its frame, conditions and hook.
struct Sealed {
    frame: Vec<u8>,
    conditions: Vec<Condition>,
    after: Option<AfterApply>,
}

struct Entry {
    write: Sealed,
    done: oneshot::Sender<Result<()>>,
}

impl Journal {
    /// Replays the journal files in `dir` into `tree`, makes that durable in
    /// sled, removes them, and starts a new journal file and the threads.
    /// Damage to the journal refuses the open ([`Error::Corrupt`]).
    pub fn open(dir: &Path, db: sled::Db, tree: sled::Tree, versioning: Versioning) -> Result<Self> {
        Self::open_with(dir, db, tree, versioning, Sizes::default(), false)
    }

    /// [`Journal::open`] that salvages a damaged journal: replays it up to
    /// the damage and moves the damaged file and every later one aside
    /// (`*.damaged`), saying so in the log.
    pub fn open_salvaging(dir: &Path, db: sled::Db, tree: sled::Tree, versioning: Versioning) -> Result<Self> {
        Self::open_with(dir, db, tree, versioning, Sizes::default(), true)
    }

    fn open_with(
        dir: &Path,
        db: sled::Db,
        tree: sled::Tree,
        versioning: Versioning,
        sizes: Sizes,
        salvage: bool,
    ) -> Result<Self> {
        for stale in [spare_path(dir), dir.join(LEGACY_SPARE), dir.join(NEW_NAME)] {
            match std::fs::remove_file(&stale) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_error("cannot remove", &stale, e));
                }
                _ => {}
            }
        }
        let recorded = read_checkpoint(dir)?;
        let marker = read_marker(&db).map_err(Error::Storage)?;
        if let Some(recorded) = recorded
            && marker.is_none_or(|m| m < recorded)
        {
            let holds = marker.map_or("none".to_string(), |m| m.to_string());
            return Err(Error::Corrupt {
                key: format!("sled database in {}", dir.display()),
                cause: format!(
                    "it lost writes it had made durable: {CHECKPOINT_FILE} records the checkpoint of journal generation {recorded}, but sled's marker holds {holds} (its db file was cut short or replaced by an older copy); restore the data directory from a backup"
                ),
            });
        }
        let head = read_head(dir)?;
        let found = generations(dir)?;
        let mut frames = 0;
        let mut damage = None;
        for (i, &(generation, format)) in found.iter().enumerate() {
            let path = format_path(dir, generation, format);
            // Files are removed only once sled holds a marker at least
            // their generation, and generations are consecutive.
            let expected = match i.checked_sub(1).and_then(|p| found.get(p)) {
                Some(&(previous, _)) => Some(previous + 1),
                None => marker.map(|m| m + 1).filter(|m| generation > *m),
            };
            if let Some(expected) = expected
                && generation != expected
            {
                let cause = format!("the journal files of generations {expected} to {} are missing", generation - 1);
                damage = Some((i, Error::Corrupt { key: format!("journal {}", path.display()), cause }));
                break;
            }
            // Files up to the recorded head were sealed before use (a file
            // cut short is reported as truncated, by `replay`).
            let full_length = std::fs::metadata(&path).is_ok_and(|m| m.len() >= sizes.file);
            if format == Format::Grouped
                && head.is_some_and(|h| generation <= h)
                && full_length
                && seal_of(&path, generation).is_none()
            {
                let cause = "it does not start with its own seal, which is synced before the file is used: it was replaced by another file (two journal files swapped, or an older copy) or damaged at its start".to_string();
                damage = Some((i, Error::Corrupt { key: format!("journal {}", path.display()), cause }));
                break;
            }
            let end = found.get(i + 1).and_then(|&(next, f)| recorded_end(&format_path(dir, next, f), next, f));
            match replay(&path, generation, format, &tree, sizes.file, end) {
                Ok(replayed) => frames += replayed.frames,
                Err(e @ Error::Corrupt { .. }) => {
                    damage = Some((i, e));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // The newest files recorded must be there (see the module docs).
        let present = found.last().map(|(g, _)| *g).into_iter().chain(marker).max();
        if damage.is_none()
            && let Some(head) = head
            && present.is_none_or(|p| p < head)
        {
            let first = present.map_or(1, |p| p + 1);
            let cause = format!(
                "the journal files of generations {first} to {head} are missing ({HEAD_FILE} records that generation {head} was created; it may hold acknowledged writes)"
            );
            damage = Some((
                found.len(),
                Error::Corrupt { key: format!("journal {}", file_path(dir, head).display()), cause },
            ));
        }
        if let Some((i, error)) = damage {
            let aside = &found[i..];
            let what = match aside.len() {
                0 => "the writes in the missing files".to_string(),
                n => format!(
                    "the writes after the damage: the rest of this file and {} later journal file(s), moved aside as *.damaged",
                    n - 1
                ),
            };
            let Error::Corrupt { key, cause } = error else { return Err(error) };
            if !salvage {
                return Err(Error::Corrupt {
                    key,
                    cause: format!(
                        "{cause}. Acknowledged writes would be lost. Restore the data directory from a backup, or start with --salvage-journal to keep the writes before the damage and drop {what}"
                    ),
                });
            }
            tracing::error!(file = %key, %cause, "salvaging the journal (--salvage-journal): keeping the writes before the damage; dropping {what}");
            for &(generation, format) in aside {
                let path = format_path(dir, generation, format);
                let mut moved = path.clone().into_os_string();
                moved.push(".damaged");
                std::fs::rename(&path, &moved).map_err(|e| io_error("cannot move aside", &path, e))?;
            }
        }
        // Never a generation used before (see the module docs).
        let past = [found.last().map(|(g, _)| *g), recorded, marker, head].into_iter().flatten().max().unwrap_or(0);
        let generation = past + 1;
        if !found.is_empty() {
            set_marker(&db, past).map_err(Error::Storage)?;
            flush(&db).map_err(|e| Error::Storage(format!("sled flush: {e}")))?;
            write_checkpoint(dir, past).map_err(|e| io_error("cannot record the checkpoint of", dir, e))?;
            // Before the new file exists: a crash in between leaves no gap.
            remove_up_to(dir, past, false)?;
            tracing::info!(frames, files = found.len(), "replayed the journal into sled");
        }
        let (file, sealed) = create(dir, generation, sizes.file, NO_PREVIOUS)?;

        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
            failure: tokio::sync::watch::channel(None).0,
            checkpointing: AtomicBool::new(false),
        });
        let (checkpoints, requests) = mpsc::channel();
        let checkpointer = {
            let (shared, dir, db) = (shared.clone(), dir.to_path_buf(), db.clone());
            spawn("tcc-checkpoint", move || {
                checkpointer(&shared, &db, &dir, &requests);
                drop_pinned(db);
            })?
        };
        let flusher = Flusher {
            shared: shared.clone(),
            db: db.clone(),
            tree,
            versioning,
            dir: dir.to_path_buf(),
            file,
            generation,
            size: sealed,
            start: sealed,
            last_checkpoint: Instant::now(),
            rotate_after: None,
            sizes,
            checkpoints,
        };
        let flusher = spawn("tcc-journal", move || flusher.run())?;
        Ok(Journal { shared, threads: Mutex::new(vec![flusher, checkpointer]) })
    }

    /// Queues a write for the next group commit.
    pub fn submit(&self, write: Write) -> Result<Pending> {
        let write = write.seal()?;
        let (done, rx) = oneshot::channel();
        {
            let mut q = lock(&self.shared.queue);
            if let Some(e) = &q.failed {
                return Err(poisoned(e));
            }
            if q.stop {
                return Err(Error::Unavailable("the store is closing".into()));
            }
            q.entries.push(Entry { write, done });
        }
        self.shared.wake.notify_one();
        Ok(Pending(rx))
    }

    /// Resolves with the cause once the journal has failed (fail-stop).
    pub async fn failed(&self) -> String {
        let mut rx = self.shared.failure.subscribe();
        let cause = rx.wait_for(Option::is_some).await.ok().and_then(|cause| cause.clone());
        match cause {
            Some(cause) => cause,
            // The sender lives as long as `self`.
            None => std::future::pending().await,
        }
    }

    /// Fails the store from outside the flusher (sled failed to write what
    /// was applied): the same fail-stop as a failed journal write. Returns
    /// the error callers get from then on.
    pub fn fail(&self, cause: String) -> Error {
        if !self.shared.failed.load(Ordering::Acquire) {
            self.shared.fail(cause);
        }
        self.check().err().unwrap_or_else(|| Error::Unavailable("the store failed".into()))
    }

    /// Fail-stop check for readers: after a failed write, sled may hold a
    /// change whose durability is unknown, so nothing is served.
    pub fn check(&self) -> Result<()> {
        if !self.shared.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &lock(&self.shared.queue).failed {
            Some(e) => Err(poisoned(e)),
            None => Ok(()),
        }
    }
}

impl Journal {
    /// Writes what is queued, checkpoints everything into sled and stops
    /// the threads; later writes are refused. Returns whether everything
    /// was checkpointed (the store had not failed). Dropping does the same.
    pub fn close(&self) -> bool {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_one();
        // The flusher writes what is queued, asks for a last checkpoint and
        // hangs up; the checkpointer runs it and exits.
        for t in std::mem::take(&mut *lock(&self.threads)) {
            let _ = t.join();
        }
        !self.shared.failed.load(Ordering::Acquire)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    /// Puts the store in its failed state, then answers what is queued:
    /// whoever hears of the failure finds every later call refused (a
    /// reader never sees a change whose durability is unknown).
    fn fail(&self, cause: String) {
        tracing::error!(%cause, "the store failed to write; refusing further requests until restart");
        let queued = {
            let mut q = lock(&self.queue);
            q.failed = Some(cause.clone());
            self.failed.store(true, Ordering::Release);
            std::mem::take(&mut q.entries)
        };
        self.failure.send_replace(Some(cause.clone()));
        for e in queued {
            let _ = e.done.send(Err(poisoned(&cause)));
        }
    }
}

fn poisoned(cause: &str) -> Error {
    Error::Unavailable(format!(
        "the store failed to write ({cause}) and takes no more requests; restart the coordinator"
    ))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    if short_of_descriptors(&e) {
        return Error::Unavailable(format!("{what} the journal {}: {e}", path.display()));
    }
    Error::Storage(format!("{what} the journal {}: {e}", path.display()))
}

/// EMFILE or ENFILE: the process or the system is out of file descriptors
/// for now, which is not a failed write (see [`Flusher::rotate`]).
fn short_of_descriptors(e: &std::io::Error) -> bool {
    use rustix::io::Errno;
    e.raw_os_error().is_some_and(|n| n == Errno::MFILE.raw_os_error() || n == Errno::NFILE.raw_os_error())
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Storage(format!("cannot start the {name} thread: {e}")))
}

// --- files ---------------------------------------------------------------

fn file_path(dir: &Path, generation: u64) -> PathBuf {
    format_path(dir, generation, Format::Grouped)
}

fn format_path(dir: &Path, generation: u64, format: Format) -> PathBuf {
    dir.join(format!("{}{generation:016}", format.prefix()))
}

/// The generations of the journal files in `dir` and their formats, oldest
/// first.
fn generations(dir: &Path) -> Result<Vec<(u64, Format)>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("cannot list", dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        for format in [Format::Grouped, Format::Legacy] {
            if let Some(generation) = name.strip_prefix(format.prefix()).and_then(|g| g.parse().ok()) {
                found.push((generation, format));
            }
        }
    }
    found.sort_unstable_by_key(|(generation, _)| *generation);
    Ok(found)
}

fn spare_path(dir: &Path) -> PathBuf {
    dir.join(SPARE_NAME)
}

/// Creates the journal file of `generation`, written from its start: the
/// spare (a checkpointed file kept for reuse) renamed, or a new file made
/// `file_bytes` long and synced under a temporary name first (so a file
/// under a journal name is never shorter than that unless damaged). Then
/// makes the directory entry durable, so that frames synced into the file
/// are found after a crash, writes and syncs the file's seal (`previous_end`:
/// where the previous file's frames end, or [`NO_PREVIOUS`]) and records
/// the generation in [`HEAD_FILE`]. Returns the file and the seal's length.
fn create(dir: &Path, generation: u64, file_bytes: u64, previous_end: u64) -> Result<(File, u64)> {
    let path = file_path(dir, generation);
    let file = match std::fs::rename(spare_path(dir), &path) {
        Ok(()) => OpenOptions::new().write(true).open(&path).map_err(|e| io_error("cannot open", &path, e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let new = dir.join(NEW_NAME);
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(&new)
                .and_then(|f| f.set_len(file_bytes).and_then(|()| f.sync_all()).map(|()| f))
                .map_err(|e| io_error("cannot create", &new, e))?;
            std::fs::rename(&new, &path).map_err(|e| io_error("cannot name", &path, e))?;
            file
        }
        Err(e) => return Err(io_error("cannot create", &path, e)),
    };
    let mut file = file;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync the directory of", &path, e))?;
    let seal = seal_frame(generation, previous_end);
    file.write_all(&seal).and_then(|()| file.sync_data()).map_err(|e| io_error("cannot seal", &path, e))?;
    write_head(dir, generation)?;
    Ok((file, seal.len() as u64))
}

/// Records `generation` as the newest in [`HEAD_FILE`], durably.
fn write_head(dir: &Path, generation: u64) -> Result<()> {
    super::integrity::replace_durably(dir, HEAD_FILE, format!("{generation}\n").as_bytes())
        .map_err(|e| io_error("cannot record the newest generation of", dir, e))
}

/// The generation recorded in [`HEAD_FILE`], if there is one.
fn read_head(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(HEAD_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| Error::Corrupt {
            key: format!("journal head {}", path.display()),
            cause: format!("cannot read {text:?}; restore the data directory from a backup"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", &path, e)),
    }
}

/// The bytes the journal files in `dir` occupy on disk (files are sparse:
/// what was written to them), which a start replays.
pub fn bytes_on_disk(dir: &Path) -> Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut bytes = 0u64;
    for (generation, format) in generations(dir)? {
        let path = format_path(dir, generation, format);
        let meta = std::fs::metadata(&path).map_err(|e| io_error("cannot read", &path, e))?;
        bytes = bytes.saturating_add(meta.blocks().saturating_mul(512));
    }
    Ok(bytes)
}

/// Removes the journal files up to `generation`, keeping the newest of them
/// as the spare when `recycle` is set.
fn remove_up_to(dir: &Path, generation: u64, recycle: bool) -> Result<()> {
    let done: Vec<(u64, Format)> = generations(dir)?.into_iter().filter(|(g, _)| *g <= generation).collect();
    for (i, (g, format)) in done.iter().enumerate() {
        let path = format_path(dir, *g, *format);
        let result = if recycle && i + 1 == done.len() && *format == Format::Grouped {
            std::fs::rename(&path, spare_path(dir))
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| io_error("cannot retire", &path, e))?;
    }
    Ok(())
}

// --- threads -------------------------------------------------------------

struct Flusher {
    shared: Arc<Shared>,
    db: sled::Db,
    tree: sled::Tree,
    versioning: Versioning,
    dir: PathBuf,
    file: File,
    generation: u64,
    /// Bytes in the current journal file.
    size: u64,
    /// Bytes of its seal (nothing to checkpoint until it holds more).
    start: u64,
    last_checkpoint: Instant,
    /// After a rotation put off for want of descriptors: not before then.
    rotate_after: Option<Instant>,
    sizes: Sizes,
    checkpoints: mpsc::Sender<u64>,
}

impl Flusher {
    fn run(mut self) {
        self.work();
        // Its sled handles, dropped where a checkpoint may still flush.
        drop_pinned(self);
    }

    fn work(&mut self) {
        let mut buf = Vec::new();
        loop {
            let (entries, stop) = {
                let q = lock(&self.shared.queue);
                let (mut q, _) = self
                    .shared
                    .wake
                    .wait_timeout_while(q, CHECKPOINT_EVERY, |q| q.entries.is_empty() && !q.stop)
                    .unwrap_or_else(|p| p.into_inner());
                (std::mem::take(&mut q.entries), q.stop)
            };
            if !entries.is_empty() && self.commit(entries, &mut buf).is_err() {
                // `commit` failed the store before answering anyone.
                return;
            }
            if stop {
                // The last checkpoint covers the current file as well; the
                // checkpointer exits once this sender is gone.
                match set_marker(&self.db, self.generation) {
                    Ok(()) => {
                        let _ = self.checkpoints.send(self.generation);
                    }
                    Err(cause) => self.shared.fail(cause),
                }
                return;
            }
            let due = self.size >= self.sizes.checkpoint
                || (self.size > self.start && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY);
            if due
                && !self.shared.checkpointing.load(Ordering::Acquire)
                && self.rotate_after.is_none_or(|at| Instant::now() >= at)
                && let Err(cause) = self.rotate()
            {
                self.shared.fail(cause);
                return;
            }
        }
    }

    /// Checks the conditions of the group in order; returns the writes to
    /// make and the refused ones with their errors (answered with the
    /// group, so a loser never hears of a winner that is not durable yet).
    #[allow(clippy::type_complexity)]
    fn admit(
        &self,
        entries: Vec<Entry>,
    ) -> std::result::Result<(Vec<Entry>, Vec<(oneshot::Sender<Result<()>>, Error)>), String> {
        let mut written: HashMap<Vec<u8>, u64> = HashMap::new();
        let mut admitted = Vec::with_capacity(entries.len());
        let mut refused = Vec::new();
        'entries: for e in entries {
            for c in &e.write.conditions {
                let found = match written.get(&c.key) {
                    Some(v) => *v,
                    None => match self.tree.get(&c.key) {
                        Ok(v) => v.map_or(0, |v| (self.versioning.version_of)(&v)),
                        Err(err) => {
                            // Failed before the writers (dropped on return) hear of it.
                            let cause = format!("sled read: {err}");
                            self.shared.fail(cause.clone());
                            return Err(cause);
                        }
                    },
                };
                if found != c.expected {
                    refused.push((e.done, (self.versioning.conflict)(&c.key, c.expected, found)));
                    continue 'entries;
                }
            }
            for c in &e.write.conditions {
                written.insert(c.key.clone(), c.next);
            }
            admitted.push(e);
        }
        Ok((admitted, refused))
    }

    /// Writes and syncs the group, applies it to sled, answers the writers.
    /// On an error the store has failed (fail-stop) before anyone was
    /// answered.
    fn commit(&mut self, entries: Vec<Entry>, buf: &mut Vec<u8>) -> std::result::Result<(), String> {
        let (mut entries, refused) = self.admit(entries)?;
        let refuse = |refused: Vec<(oneshot::Sender<Result<()>>, Error)>| {
            for (done, err) in refused {
                let _ = done.send(Err(err));
            }
        };
        if entries.is_empty() {
            refuse(refused);
            return Ok(());
        }
        buf.clear();
        for e in &mut entries {
            stamp(&mut e.write.frame, self.generation, self.size);
            buf.extend_from_slice(&e.write.frame);
        }
        let started = Instant::now();
        let synced = self.file.write_all(buf).and_then(|()| self.file.sync_data());
        crate::metrics::group_commit(entries.len(), started.elapsed());
        let mut answers = Vec::with_capacity(entries.len());
        let mut failure =
            synced.err().map(|e| format!("journal {}: {e}", file_path(&self.dir, self.generation).display()));
        for e in entries {
            if failure.is_none() {
                match apply(&self.tree, &e.write.frame[HEADER..]) {
                    Ok(()) => {
                        if let Some(after) = e.write.after {
                            after();
                        }
                    }
                    Err(err) => failure = Some(err.to_string()),
                }
            }
            answers.push(e.done);
        }
        match failure {
            None => {
                self.size += buf.len() as u64;
                for done in answers {
                    let _ = done.send(Ok(()));
                }
                refuse(refused);
                Ok(())
            }
            Some(cause) => {
                // Failed first, answered after (see `Shared::fail`).
                self.shared.fail(cause.clone());
                for done in answers.into_iter().chain(refused.into_iter().map(|(done, _)| done)) {
                    let _ = done.send(Err(poisoned(&cause)));
                }
                Err(cause)
            }
        }
    }

    /// Continues in a new journal file and hands the old one to the
    /// checkpointer: everything in it is already applied to sled. Without
    /// a descriptor for the new file (EMFILE, ENFILE), writes go on in the
    /// current one and the rotation is tried again a little later: a
    /// transient shortage never stops the store.
    fn rotate(&mut self) -> std::result::Result<(), String> {
        let next = self.generation + 1;
        // The new file starts with where this one's frames end, synced
        // before anything else goes there (see `replay`).
        let sealed;
        (self.file, sealed) = match create(&self.dir, next, self.sizes.file, self.size) {
            Ok(created) => created,
            Err(Error::Unavailable(cause)) => {
                tracing::warn!(%cause, "out of file descriptors: the journal goes on in its current file; checkpoint put off by {} ms", ROTATION_RETRY.as_millis());
                self.rotate_after = Some(Instant::now() + ROTATION_RETRY);
                return Ok(());
            }
            Err(e) => return Err(e.to_string()),
        };
        self.rotate_after = None;
        let done = std::mem::replace(&mut self.generation, next);
        self.size = sealed;
        self.start = self.size;
        self.last_checkpoint = Instant::now();
        set_marker(&self.db, done)?;
        self.shared.checkpointing.store(true, Ordering::Release);
        self.checkpoints.send(done).map_err(|_| "the checkpoint thread is gone".to_string())
    }
}

/// Runs `Db::flush`, after which sled holds everything in the journal files
/// up to the requested generation, then removes those files.
fn checkpointer(shared: &Shared, db: &sled::Db, dir: &Path, requests: &mpsc::Receiver<u64>) {
    while let Ok(generation) = requests.recv() {
        let done = flush(db)
            .map_err(|e| format!("sled flush: {e}"))
            .and_then(|_| match write_checkpoint(dir, generation) {
                // Short of descriptors: the record lags behind sled's
                // marker, which the check at open allows.
                Err(e) if short_of_descriptors(&e) => {
                    tracing::warn!(cause = %e, "out of file descriptors: checkpoint {generation} not recorded");
                    Ok(())
                }
                other => other.map_err(|e| format!("cannot record the checkpoint in {}: {e}", dir.display())),
            })
            .and_then(|()| match remove_up_to(dir, generation, true) {
                // Short of descriptors: the next checkpoint removes them.
                Err(Error::Unavailable(cause)) => {
                    tracing::warn!(%cause, "out of file descriptors: checkpointed journal files kept for now");
                    Ok(())
                }
                other => other.map_err(|e| e.to_string()),
            });
        shared.checkpointing.store(false, Ordering::Release);
        if let Err(cause) = done {
            shared.fail(cause);
            return;
        }
    }
}

/// `Db::flush`, on a thread pinned to sled's epoch while it runs.
///
/// sled 0.34.7 reads its current I/O buffer with an unprotected
/// `Arc::from_raw` of an atomic pointer (`IoBufs::current_iobuf`), and its
/// flush does so without pinning an epoch; a writer that seals that buffer
/// meanwhile defers its drop to the epoch collector. On an unpinned thread
/// the drop can run between the load and the clone: a use after free, seen
/// as `double free or corruption` aborts when a flush met writes on other
/// threads (sled's own flusher, or the journal applying a group during a
/// checkpoint). A pinned thread holds back every drop deferred after it
/// pinned, so the buffer it loads stays alive until the flush returns.
fn flush(db: &sled::Db) -> sled::Result<usize> {
    let _pinned = sled::pin();
    db.flush()
}

/// Drops `db` (and with it, when it is the last handle, sled's final flush)
/// pinned, as [`flush`] runs: where a drop may meet a writer.
fn drop_pinned<T>(sled: T) {
    let _pinned = sled::pin();
    drop(sled);
}

/// The generation in [`CHECKPOINT_FILE`], if there is one.
fn read_checkpoint(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(CHECKPOINT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map(Some).map_err(|_| Error::Corrupt {
            key: format!("checkpoint record {}", path.display()),
            cause: format!("cannot read {text:?}; restore the data directory from a backup"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error("cannot read", &path, e)),
    }
}

/// Records the completed checkpoint of `generation` durably.
fn write_checkpoint(dir: &Path, generation: u64) -> std::io::Result<()> {
    super::integrity::replace_durably(dir, CHECKPOINT_FILE, format!("{generation}\n").as_bytes())
}

/// A file's seal: the first frame of a file made by a rotation, recording
/// where the previous file's frames end.
fn seal_frame(generation: u64, previous_end: u64) -> Vec<u8> {
    let mut frame = vec![0; HEADER];
    frame.push(OP_SEAL);
    frame.extend_from_slice(&previous_end.to_le_bytes());
    let len = (frame.len() - HEADER) as u32;
    frame[..4].copy_from_slice(&len.to_le_bytes());
    stamp(&mut frame, generation, 0);
    frame
}

/// Where the previous file's frames end, by the seal at the start of the
/// file of `generation` (none: a file made at open, a legacy file, or a
/// crash before the seal was synced).
fn recorded_end(path: &Path, generation: u64, format: Format) -> Option<u64> {
    if format != Format::Grouped {
        return None;
    }
    seal_of(path, generation).filter(|end| *end != NO_PREVIOUS)
}

/// The `end` of the seal of `generation` the file at `path` starts with,
/// if it starts with one.
fn seal_of(path: &Path, generation: u64) -> Option<u64> {
    let mut head = vec![0; HEADER + 9];
    let mut file = File::open(path).ok()?;
    std::io::Read::read_exact(&mut file, &mut head).ok()?;
    let (payload, _) = frame(&head, generation, Format::Grouped).ok()?;
    match payload.split_first() {
        Some((&OP_SEAL, end)) => end.try_into().ok().map(u64::from_le_bytes),
        _ => None,
    }
}

/// The checkpoint marker sled holds.
fn read_marker(db: &sled::Db) -> std::result::Result<Option<u64>, String> {
    let value = db.get(MARKER).map_err(|e| format!("sled read: {e}"))?;
    Ok(value.and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok()).map(u64::from_le_bytes))
}

/// Sets the checkpoint marker (applied after everything applied before).
fn set_marker(db: &sled::Db, generation: u64) -> std::result::Result<(), String> {
    db.insert(MARKER, &generation.to_le_bytes()).map(|_| ()).map_err(|e| format!("sled write: {e}"))
}

/// What replay found.
#[derive(Debug, PartialEq, Eq)]
struct Replayed {
    frames: u64,
    /// Bytes after the last frame: an interrupted write, a recycled file's
    /// old content, or the zeros a new file is created with.
    dropped: usize,
}

/// Applies the frames of the journal file of `generation` to `tree`, up to
/// the first frame that is incomplete or fails its checksum: the end of
/// what was written to it, unless acknowledged frames follow it (then the
/// frames before it are applied and the error names the damage). A file of
/// the current format shorter than `min_len` was truncated. `end` is where
/// the next file's seal says this one's frames end, if there is one.
fn replay(
    path: &Path,
    generation: u64,
    format: Format,
    tree: &sled::Tree,
    min_len: u64,
    end: Option<u64>,
) -> Result<Replayed> {
    let bytes = std::fs::read(path).map_err(|e| io_error("cannot read", path, e))?;
    let damaged = |offset: usize, cause: String| Error::Corrupt {
        key: format!("journal {} at byte {offset}", path.display()),
        cause,
    };
    let mut pos = 0;
    let mut frames = 0;
    let mut stop = None;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        match frame(rest, generation, format) {
            Ok((payload, used)) => {
                apply(tree, payload).map_err(|e| match e {
                    Applied::Malformed(cause) => damaged(pos, cause),
                    Applied::Sled(e) => Error::Storage(e.to_string()),
                })?;
                pos += used;
                frames += 1;
            }
            Err(cause) => {
                let follows = match format {
                    Format::Grouped => acknowledged_after(&bytes, pos, generation),
                    Format::Legacy => legacy_frame_follows(rest, generation).then_some(pos),
                };
                if let Some(at) = follows {
                    return Err(damaged(
                        pos,
                        format!("{cause}, and acknowledged writes follow it (a valid frame at byte {at})"),
                    ));
                }
                stop = Some(cause);
                break;
            }
        }
    }
    if let Some(end) = end
        && pos as u64 != end
    {
        let why = stop.as_deref().map(|c| format!(" ({c})")).unwrap_or_default();
        return Err(damaged(
            pos,
            format!(
                "the frames end here{why}, but the next journal file records that this one's acknowledged frames end at byte {end}"
            ),
        ));
    }
    if format == Format::Grouped && (bytes.len() as u64) < min_len {
        return Err(damaged(
            pos,
            format!(
                "the file is {} bytes, shorter than the {min_len} bytes every journal file is created with: it was truncated",
                bytes.len()
            ),
        ));
    }
    let dropped = bytes.len() - pos;
    if let Some(cause) = stop
        && bytes[pos..].iter().any(|b| *b != 0)
    {
        tracing::info!(
            file = %path.display(),
            offset = pos,
            bytes = dropped,
            %cause,
            "end of journal file; the bytes after it were never acknowledged (an interrupted write, or a recycled file's old content)"
        );
    }
    Ok(Replayed { frames, dropped })
}

/// Splits one frame off `bytes`: its payload and its length with header.
fn frame(bytes: &[u8], generation: u64, format: Format) -> std::result::Result<(&[u8], usize), String> {
    let size = format.header();
    let header = bytes.get(..size).ok_or("truncated frame header")?;
    let (len, crc) = (le_u32(header) as usize, le_u32(&header[4..]));
    if len == 0 {
        return Err("empty frame".into());
    }
    let payload = bytes.get(size..size + len).ok_or("truncated frame")?;
    let group = (format == Format::Grouped).then(|| le_u64(&header[8..]));
    if checksum(generation, group, payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((payload, size + len))
}

/// The offset of a valid frame after the bad one at `bad` whose group
/// starts after `bad`: one synced after the bad frame was, which makes that
/// frame acknowledged data, not an interrupted write. Tries every offset;
/// runs of zeros (the unwritten rest of a file) are skipped eight bytes at
/// a time, and a frame's shape is checked before its checksum.
fn acknowledged_after(bytes: &[u8], bad: usize, generation: u64) -> Option<usize> {
    let mut q = bad + 1;
    while q + HEADER <= bytes.len() {
        if let Some(zeros) = bytes.get(q..q + 8)
            && zeros == [0; 8]
        {
            // No header starts in the first five of eight zeros (its
            // length would be 0).
            q += 5;
            continue;
        }
        let header = &bytes[q..q + HEADER];
        let len = le_u32(header) as usize;
        let group = le_u64(&header[8..]);
        let fits = len > 0 && q + HEADER + len <= bytes.len();
        if fits && group > bad as u64 && group <= q as u64 {
            let payload = &bytes[q + HEADER..q + HEADER + len];
            if well_formed(payload) && checksum(generation, Some(group), payload) == le_u32(&header[4..]) {
                return Some(q);
            }
        }
        q += 1;
    }
    None
}

/// Whether `payload` is a list of whole operations (before its checksum is
/// worth computing).
fn well_formed(mut payload: &[u8]) -> bool {
    while let Some((&op, rest)) = payload.split_first() {
        payload = rest;
        let parts = match op {
            OP_INSERT => 2,
            OP_REMOVE => 1,
            OP_SEAL => match payload.get(8..) {
                Some(rest) => {
                    payload = rest;
                    continue;
                }
                None => return false,
            },
            _ => return false,
        };
        for _ in 0..parts {
            if take_bytes(&mut payload).is_err() {
                return false;
            }
        }
    }
    true
}

/// The rule of the legacy format: a valid frame starts right after the bad
/// frame at the start of `bytes`, whose header claims a length that fits.
fn legacy_frame_follows(bytes: &[u8], generation: u64) -> bool {
    let Some(len) = bytes.get(..4).map(|h| le_u32(h) as usize) else { return false };
    match bytes.get(Format::Legacy.header() + len..) {
        Some(rest) if len > 0 && !rest.is_empty() => frame(rest, generation, Format::Legacy).is_ok(),
        _ => false,
    }
}

/// Why a frame could not be applied.
#[derive(Debug, thiserror::Error)]
enum Applied {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
}

/// Applies a frame's operations to sled, one key at a time: sled need not
/// apply a frame atomically, because replay re-applies whole frames from
/// the last checkpoint on, and the engine reads a transaction only under its
/// lock, after its write was acknowledged (whole).
fn apply(tree: &sled::Tree, mut payload: &[u8]) -> std::result::Result<(), Applied> {
    while let Some((&op, rest)) = payload.split_first() {
        payload = rest;
        match op {
            OP_INSERT => {
                let key = take_bytes(&mut payload).map_err(Applied::Malformed)?;
                let value = take_bytes(&mut payload).map_err(Applied::Malformed)?;
                tree.insert(key, value)?;
            }
            OP_REMOVE => {
                let key = take_bytes(&mut payload).map_err(Applied::Malformed)?;
                tree.remove(key)?;
            }
            // Changes nothing: read by `open` (see `recorded_end`).
            OP_SEAL => payload = payload.get(8..).ok_or_else(|| Applied::Malformed("truncated seal".into()))?,
            other => return Err(Applied::Malformed(format!("unknown operation {other}"))),
        }
    }
    Ok(())
}

/// The little-endian u32 at the start of `bytes` (at least 4 long).
fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// The little-endian u64 at the start of `bytes` (at least 8 long).
fn le_u64(bytes: &[u8]) -> u64 {
    u64::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3], bytes[4], bytes[5], bytes[6], bytes[7]])
}

fn take_bytes<'a>(payload: &mut &'a [u8]) -> std::result::Result<&'a [u8], String> {
    let len = le_u32(payload.get(..4).ok_or("truncated length")?) as usize;
    let bytes = payload.get(4..4 + len).ok_or("truncated bytes")?;
    *payload = &payload[4 + len..];
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values carry their version in their first byte.
    const TEST_VERSIONING: Versioning = Versioning {
        version_of: |v| v.first().copied().unwrap_or(0) as u64,
        conflict: |_, expected, found| Error::Storage(format!("conflict: expected {expected}, found {found}")),
    };

    /// Small files for the tests: rotation after `checkpoint` bytes, files
    /// created 4 KiB long.
    const SMALL: u64 = 4096;

    fn small(checkpoint: u64) -> Sizes {
        Sizes { checkpoint, file: SMALL }
    }

    type Op<'a> = (&'a [u8], Option<&'a [u8]>);
    type Ops<'a> = &'a [Op<'a>];

    /// A frame of generation 1 as the first group of a file holds it.
    fn frame_of(ops: Ops<'_>) -> Vec<u8> {
        frame_in(1, 0, ops)
    }

    /// A frame of `generation` in the group starting at byte `group`.
    fn frame_in(generation: u64, group: u64, ops: Ops<'_>) -> Vec<u8> {
        let mut w = Write::default();
        for (k, v) in ops {
            match v {
                Some(v) => w.insert(k, v),
                None => w.remove(k),
            }
        }
        match w.seal() {
            Ok(mut sealed) => {
                stamp(&mut sealed.frame, generation, group);
                sealed.frame
            }
            Err(e) => panic!("seal: {e}"),
        }
    }

    /// A file of `generation` with one group per frame, padded with zeros
    /// to `SMALL` bytes as files are created; and where each frame starts.
    fn file_of(generation: u64, frames: &[Ops<'_>]) -> (Vec<u8>, Vec<usize>) {
        let mut bytes = Vec::new();
        let mut starts = Vec::new();
        for ops in frames {
            starts.push(bytes.len());
            bytes.extend(frame_in(generation, bytes.len() as u64, ops));
        }
        if bytes.len() < SMALL as usize {
            bytes.resize(SMALL as usize, 0);
        }
        (bytes, starts)
    }

    /// `n` frames setting keys `k0..k{n}`.
    fn numbered(generation: u64, n: usize) -> (Vec<u8>, Vec<usize>) {
        let keys: Vec<Vec<u8>> = (0..n).map(|i| format!("k{i}").into_bytes()).collect();
        let ops: Vec<Vec<Op<'_>>> = keys.iter().map(|k| vec![(k.as_slice(), Some(&b"v"[..]))]).collect();
        let frames: Vec<Ops<'_>> = ops.iter().map(|o| o.as_slice()).collect();
        file_of(generation, &frames)
    }

    fn io(e: std::io::Error) -> Error {
        Error::Storage(e.to_string())
    }

    struct Fixture {
        dir: tempfile::TempDir,
        db: sled::Db,
        tree: sled::Tree,
    }

    fn fixture() -> Result<Fixture> {
        let dir = tempfile::tempdir().map_err(io)?;
        // As the store opens it: sled's own periodic flush off.
        let db = sled::Config::new().path(dir.path().join("db")).flush_every_ms(None).open().map_err(sled_err)?;
        let tree = db.open_tree("t").map_err(sled_err)?;
        Ok(Fixture { dir, db, tree })
    }

    fn get(tree: &sled::Tree, k: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(tree.get(k).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn sled_err(e: sled::Error) -> Error {
        Error::Storage(e.to_string())
    }

    fn corrupt(result: Result<Replayed>) -> (String, String) {
        match result {
            Err(Error::Corrupt { key, cause }) => (key, cause),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn replay_applies_frames_in_order_and_twice_is_the_same() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let (bytes, _) = file_of(1, &[&[(b"a", Some(b"1")), (b"b", Some(b"2"))], &[(b"a", None), (b"b", Some(b"3"))]]);
        std::fs::write(&path, &bytes).map_err(io)?;
        // Replaying twice (a crash during recovery) ends in the same state.
        for _ in 0..2 {
            assert_eq!(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None)?.frames, 2);
            assert_eq!(get(&f.tree, b"a")?, None);
            assert_eq!(get(&f.tree, b"b")?, Some(b"3".to_vec()));
        }
        Ok(())
    }

    #[test]
    fn a_torn_last_write_ends_the_file() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let first = frame_of(&[(b"a", Some(b"1"))]);
        let second = frame_in(1, first.len() as u64, &[(b"b", Some(b"2"))]);
        for cut in [1, HEADER, second.len() - 1] {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second[..cut]);
            bytes.resize(SMALL as usize, 0);
            std::fs::write(&path, &bytes).map_err(io)?;
            let replayed = replay(&path, 1, Format::Grouped, &f.tree, SMALL, None)?;
            assert_eq!(replayed, Replayed { frames: 1, dropped: SMALL as usize - first.len() }, "cut at {cut}");
            assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()));
            assert_eq!(get(&f.tree, b"b")?, None);
        }
        Ok(())
    }

    /// After a power loss the last group may have holes: a bad frame
    /// followed by valid frames *of the same group* is an interrupted
    /// write, not damage.
    #[test]
    fn holes_in_the_last_group_are_an_interrupted_write() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let first = frame_of(&[(b"a", Some(b"1"))]);
        let group = first.len() as u64;
        let mut torn = frame_in(1, group, &[(b"b", Some(b"2"))]);
        let later_in_group = frame_in(1, group, &[(b"c", Some(b"3"))]);
        torn[HEADER] ^= 0xff;
        let mut bytes = first.clone();
        bytes.extend(&torn);
        bytes.extend(&later_in_group);
        bytes.resize(SMALL as usize, 0);
        std::fs::write(&path, &bytes).map_err(io)?;
        assert_eq!(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None)?.frames, 1);
        assert_eq!(get(&f.tree, b"c")?, None, "nothing of the interrupted group is applied");
        Ok(())
    }

    #[test]
    fn a_flipped_bit_before_acknowledged_writes_is_damage() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let (mut bytes, starts) = numbered(1, 40);
        bytes[starts[10] + HEADER + 1] ^= 0x40;
        std::fs::write(&path, &bytes).map_err(io)?;
        let (key, cause) = corrupt(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None));
        assert_eq!(key, format!("journal {} at byte {}", path.display(), starts[10]));
        assert!(cause.starts_with("checksum mismatch, and acknowledged writes follow it"), "{cause}");
        assert_eq!(get(&f.tree, b"k9")?, Some(b"v".to_vec()), "the writes before the damage are applied");
        assert_eq!(get(&f.tree, b"k11")?, None, "nothing after the damage is applied");
        Ok(())
    }

    /// A flipped length makes the next frame start in the wrong place; the
    /// frames after are still found, at whatever offset they are.
    #[test]
    fn a_flipped_length_is_damage_not_an_end() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        for flip in [0x01u8, 0x10, 0x80] {
            let (mut bytes, starts) = numbered(1, 40);
            bytes[starts[20]] ^= flip;
            std::fs::write(&path, &bytes).map_err(io)?;
            let (key, cause) = corrupt(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None));
            assert_eq!(key, format!("journal {} at byte {}", path.display(), starts[20]), "flip {flip:#x}");
            assert!(cause.contains("acknowledged writes follow it"), "{cause}");
        }
        Ok(())
    }

    #[test]
    fn a_zeroed_block_is_damage_not_an_end() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let (mut bytes, starts) = numbered(1, 200);
        let block = starts[50]..starts[50] + 512;
        bytes[block].fill(0);
        std::fs::write(&path, &bytes).map_err(io)?;
        let (key, cause) = corrupt(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None));
        assert_eq!(key, format!("journal {} at byte {}", path.display(), starts[50]));
        assert!(cause.starts_with("empty frame, and acknowledged writes follow it"), "{cause}");
        Ok(())
    }

    /// A file cut anywhere (mid-frame, at a frame boundary, past the
    /// frames) is shorter than files are created: damage.
    #[test]
    fn a_truncated_file_is_damage() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let (bytes, starts) = numbered(1, 40);
        let written = starts[39] + frame_of(&[(b"k39", Some(b"v"))]).len();
        for cut in [0, 3, starts[20], starts[20] + 5, written, written + 100, SMALL as usize - 1] {
            std::fs::write(&path, &bytes[..cut]).map_err(io)?;
            let (_, cause) = corrupt(replay(&path, 1, Format::Grouped, &f.tree, SMALL, None));
            assert!(cause.contains("it was truncated"), "cut at {cut}: {cause}");
        }
        Ok(())
    }

    #[test]
    fn legacy_files_are_replayed_with_their_own_rule() -> Result<()> {
        let f = fixture()?;
        let path = format_path(f.dir.path(), 1, Format::Legacy);
        // The first format: `len | crc(generation, payload) | payload`.
        let legacy = |ops: Ops<'_>| {
            let mut frame = frame_in(1, 0, ops);
            frame.drain(8..HEADER);
            let crc = checksum(1, None, &frame[8..]);
            frame[4..8].copy_from_slice(&crc.to_le_bytes());
            frame
        };
        let mut bytes = legacy(&[(b"a", Some(b"1"))]);
        bytes.extend(legacy(&[(b"b", Some(b"2"))]));
        bytes.extend([0; 10]);
        std::fs::write(&path, &bytes).map_err(io)?;
        assert_eq!(replay(&path, 1, Format::Legacy, &f.tree, SMALL, None)?, Replayed { frames: 2, dropped: 10 });
        assert_eq!(get(&f.tree, b"b")?, Some(b"2".to_vec()));
        Ok(())
    }

    #[test]
    fn open_replays_every_file_in_generation_order_then_starts_a_new_one() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let legacy_spare = dir.join(LEGACY_SPARE);
        std::fs::write(file_path(dir, 7), file_of(7, &[&[(b"a", Some(b"old")), (b"b", Some(b"1"))]]).0).map_err(io)?;
        std::fs::write(file_path(dir, 8), file_of(8, &[&[(b"a", Some(b"new"))]]).0).map_err(io)?;
        // A spare from an earlier run is never reused: its old frames could
        // carry the generation numbers this run starts again from.
        std::fs::write(spare_path(dir), file_of(9, &[&[(b"c", Some(b"stale"))]]).0).map_err(io)?;
        std::fs::write(&legacy_spare, b"old").map_err(io)?;
        let journal = Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false)?;
        assert_eq!(get(&f.tree, b"a")?, Some(b"new".to_vec()));
        assert_eq!(get(&f.tree, b"b")?, Some(b"1".to_vec()));
        assert_eq!(generations(dir)?, vec![(9, Format::Grouped)], "replayed files removed once sled is flushed");
        let new = std::fs::read(file_path(dir, 9)).map_err(io)?;
        let seal = seal_frame(9, NO_PREVIOUS);
        assert_eq!(new[..seal.len()], seal, "a new file starts with its seal");
        assert!(new[seal.len()..].iter().all(|b| *b == 0), "then zeros");
        assert_eq!(read_head(dir)?, Some(9), "the newest generation is recorded");
        assert!(!legacy_spare.exists());
        drop(journal);
        assert_eq!(get(&f.tree, b"c")?, None);
        Ok(())
    }

    #[test]
    fn a_missing_file_is_damage_and_salvage_keeps_what_comes_before() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        std::fs::write(file_path(dir, 1), file_of(1, &[&[(b"a", Some(b"1"))]]).0).map_err(io)?;
        std::fs::write(file_path(dir, 3), file_of(3, &[&[(b"b", Some(b"2"))]]).0).map_err(io)?;
        let open =
            |salvage| Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), salvage);
        match open(false) {
            Err(Error::Corrupt { key, cause }) => {
                assert!(key.contains("tcc-wal-0000000000000003"), "{key}");
                assert!(cause.contains("generations 2 to 2 are missing"), "{cause}");
                assert!(cause.contains("Restore the data directory from a backup"), "{cause}");
                assert!(cause.contains("--salvage-journal"), "{cause}");
                assert!(cause.contains("0 later journal file(s)"), "{cause}");
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("expected Corrupt, got a journal"),
        }
        assert!(file_path(dir, 3).exists(), "nothing is touched without --salvage-journal");
        let journal = open(true)?;
        assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()));
        assert_eq!(get(&f.tree, b"b")?, None);
        let mut aside = file_path(dir, 3).into_os_string();
        aside.push(".damaged");
        assert!(std::path::Path::new(&aside).exists(), "the dropped file is kept aside");
        assert_eq!(generations(dir)?, vec![(4, Format::Grouped)], "numbering goes on after the dropped file");
        drop(journal);
        Ok(())
    }

    /// A rotation starts the next file with where this one's frames end:
    /// damage to the last frames of a file that has a successor is found.
    #[test]
    fn damage_at_the_end_of_a_sealed_file_is_refused() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let (mut first, starts) = numbered(1, 10);
        let end = starts[9] + frame_of(&[(b"k9", Some(b"v"))]).len();
        let mut second = seal_frame(2, end as u64);
        second.extend(frame_in(2, second.len() as u64, &[(b"later", Some(b"x"))]));
        second.resize(SMALL as usize, 0);
        std::fs::write(file_path(dir, 2), &second).map_err(io)?;
        assert_eq!(recorded_end(&file_path(dir, 2), 2, Format::Grouped), Some(end as u64));
        // Undamaged, both replay.
        std::fs::write(file_path(dir, 1), &first).map_err(io)?;
        let journal = Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false)?;
        drop(journal);
        assert_eq!(get(&f.tree, b"later")?, Some(b"x".to_vec()));
        // The last frame of the first file zeroed: nothing follows it in
        // its file, but the seal says it was acknowledged.
        let f = fixture()?;
        let dir = f.dir.path();
        first[starts[9]..end].fill(0);
        std::fs::write(file_path(dir, 1), &first).map_err(io)?;
        std::fs::write(file_path(dir, 2), &second).map_err(io)?;
        match Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false) {
            Err(Error::Corrupt { cause, .. }) => assert!(cause.contains(&format!("end at byte {end}")), "{cause}"),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("damage at the end of a sealed file was taken for its end"),
        }
        Ok(())
    }

    /// The oldest file is missing: sled's checkpoint marker says which
    /// generation must come first.
    #[test]
    fn a_missing_oldest_file_is_damage() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        set_marker(&f.db, 5).map_err(Error::Storage)?;
        std::fs::write(file_path(dir, 7), file_of(7, &[&[(b"a", Some(b"1"))]]).0).map_err(io)?;
        match Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false) {
            Err(Error::Corrupt { cause, .. }) => assert!(cause.contains("generations 6 to 6 are missing"), "{cause}"),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("a missing oldest file went unnoticed"),
        }
        // The file right after the marker is fine.
        std::fs::rename(file_path(dir, 7), file_path(dir, 6)).map_err(io)?;
        let bytes = file_of(6, &[&[(b"a", Some(b"1"))]]).0;
        std::fs::write(file_path(dir, 6), bytes).map_err(io)?;
        drop(Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false)?);
        assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()));
        Ok(())
    }

    /// A sealed file of `generation` (`previous_end` as its seal says) with
    /// one group per frame, padded to `SMALL`.
    fn sealed_file(generation: u64, previous_end: u64, frames: &[Ops<'_>]) -> Vec<u8> {
        let mut bytes = seal_frame(generation, previous_end);
        for ops in frames {
            bytes.extend(frame_in(generation, bytes.len() as u64, ops));
        }
        bytes.resize(SMALL as usize, 0);
        bytes
    }

    /// The newest (here the only) journal file deleted: the head record
    /// says it was created, so its writes are missing, not absent.
    #[test]
    fn a_missing_newest_file_is_damage() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let open =
            |salvage| Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), salvage);
        drop(open(false)?);
        set_marker(&f.db, 3).map_err(Error::Storage)?;
        std::fs::write(file_path(dir, 4), sealed_file(4, NO_PREVIOUS, &[&[(b"a", Some(b"1"))]])).map_err(io)?;
        write_head(dir, 5)?;
        // File 5 was created (the head says so) and deleted.
        match open(false) {
            Err(Error::Corrupt { key, cause }) => {
                assert!(key.contains("tcc-wal-0000000000000005"), "{key}");
                assert!(cause.contains("generations 5 to 5 are missing"), "{cause}");
                assert!(cause.contains("--salvage-journal"), "{cause}");
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("a missing newest file went unnoticed"),
        }
        assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()), "the files before it replay");
        // The only file deleted.
        std::fs::remove_file(file_path(dir, 4)).map_err(io)?;
        match open(false) {
            Err(Error::Corrupt { cause, .. }) => assert!(cause.contains("generations 4 to 5 are missing"), "{cause}"),
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("a missing only file went unnoticed"),
        }
        // Salvage starts anyway, numbering on past the missing files.
        drop(open(true)?);
        assert_eq!(read_head(dir)?, Some(6));
        drop(open(false)?);
        Ok(())
    }

    /// Two journal files swapped (or one replaced by an older copy): each
    /// starts with a seal of another generation.
    #[test]
    fn swapped_files_are_damage() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let first = sealed_file(1, NO_PREVIOUS, &[&[(b"a", Some(b"1"))]]);
        let end = (seal_frame(1, NO_PREVIOUS).len() + frame_of(&[(b"a", Some(b"1"))]).len()) as u64;
        let second = sealed_file(2, end, &[&[(b"a", Some(b"2"))]]);
        write_head(dir, 2)?;
        let open = || Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false);
        std::fs::write(file_path(dir, 1), &second).map_err(io)?;
        std::fs::write(file_path(dir, 2), &first).map_err(io)?;
        match open() {
            Err(Error::Corrupt { key, cause }) => {
                assert!(key.contains("tcc-wal-0000000000000001"), "{key}");
                assert!(cause.contains("does not start with its own seal"), "{cause}");
            }
            Err(e) => panic!("expected Corrupt, got {e}"),
            Ok(_) => panic!("swapped files went unnoticed"),
        }
        // In their places, both replay.
        std::fs::write(file_path(dir, 1), &first).map_err(io)?;
        std::fs::write(file_path(dir, 2), &second).map_err(io)?;
        drop(open()?);
        assert_eq!(get(&f.tree, b"a")?, Some(b"2".to_vec()));
        Ok(())
    }

    /// A crash after a file was created but before the head recorded it:
    /// the file holds no acknowledged write, and needs no seal.
    #[test]
    fn a_file_past_the_head_is_an_interrupted_creation() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        std::fs::write(file_path(dir, 1), sealed_file(1, NO_PREVIOUS, &[&[(b"a", Some(b"1"))]])).map_err(io)?;
        std::fs::write(file_path(dir, 2), vec![0; SMALL as usize]).map_err(io)?;
        write_head(dir, 1)?;
        drop(Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), false)?);
        assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()));
        Ok(())
    }

    #[test]
    fn salvage_replays_up_to_the_damage() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let (mut bytes, starts) = numbered(1, 40);
        bytes[starts[30] + HEADER] ^= 1;
        std::fs::write(file_path(dir, 1), &bytes).map_err(io)?;
        std::fs::write(file_path(dir, 2), file_of(2, &[&[(b"later", Some(b"x"))]]).0).map_err(io)?;
        let journal = Journal::open_with(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(SMALL), true)?;
        assert_eq!(get(&f.tree, b"k29")?, Some(b"v".to_vec()));
        assert_eq!(get(&f.tree, b"k31")?, None);
        assert_eq!(get(&f.tree, b"later")?, None, "files after the damage are dropped too");
        drop(journal);
        Ok(())
    }

    #[test]
    fn a_recycled_file_replays_only_what_its_new_generation_wrote() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let (mut old, _) = create(dir, 1, SMALL, NO_PREVIOUS)?;
        let (old_bytes, _) = file_of(1, &[&[(b"a", Some(b"1")), (b"b", Some(b"2"))], &[(b"c", Some(b"3"))]]);
        old.write_all(&old_bytes).map_err(io)?;
        drop(old);
        remove_up_to(dir, 1, true)?;
        assert_eq!(generations(dir)?, Vec::new());
        let (mut new, sealed) = create(dir, 2, SMALL, NO_PREVIOUS)?;
        let bytes = std::fs::read(file_path(dir, 2)).map_err(io)?;
        assert!(bytes[sealed as usize..].iter().any(|b| *b != 0), "the spare was reused");
        new.write_all(&frame_in(2, sealed, &[(b"a", Some(b"9"))])).map_err(io)?;
        let replayed = replay(&file_path(dir, 2), 2, Format::Grouped, &f.tree, SMALL, None)?;
        assert_eq!(replayed.frames, 2, "the seal and the write");
        assert_eq!(get(&f.tree, b"a")?, Some(b"9".to_vec()));
        assert_eq!(get(&f.tree, b"b")?, None);
        assert_eq!(get(&f.tree, b"c")?, None, "an old frame, intact but of generation 1, is not replayed");
        Ok(())
    }

    #[tokio::test]
    async fn an_acknowledged_write_is_in_the_journal_and_in_sled() -> Result<()> {
        let f = fixture()?;
        let journal =
            Journal::open_with(f.dir.path(), f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(1 << 20), false)?;
        let mut w = Write::default();
        w.insert(b"k", b"v");
        w.remove(b"gone");
        journal.submit(w)?.durable().await?;
        assert_eq!(get(&f.tree, b"k")?, Some(b"v".to_vec()), "applied to sled once acknowledged");
        // On disk before any checkpoint: what replay would find after a crash.
        let on_disk = std::fs::read(file_path(f.dir.path(), 1)).map_err(io)?;
        let seal = seal_frame(1, NO_PREVIOUS).len();
        let frame = frame_in(1, seal as u64, &[(b"k", Some(b"v")), (b"gone", None)]);
        assert_eq!(on_disk[seal..seal + frame.len()], frame);
        assert_eq!(on_disk.len() as u64, SMALL, "files are created full length");
        // A clean close checkpoints and removes the journal.
        drop(journal);
        assert_eq!(generations(f.dir.path())?, Vec::new());
        assert_eq!(get(&f.tree, b"k")?, Some(b"v".to_vec()));
        Ok(())
    }

    #[tokio::test]
    async fn after_a_failed_rotation_every_write_and_read_is_refused() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path().join("journal");
        std::fs::create_dir(&dir).map_err(io)?;
        // Rotate after every write; the first rotation fails because the
        // directory is gone (the open file still takes the first write).
        let journal = Journal::open_with(&dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, small(1), false)?;
        std::fs::remove_dir_all(&dir).map_err(io)?;
        let mut w = Write::default();
        w.insert(b"a", b"1");
        journal.submit(w)?.durable().await?;
        let mut w = Write::default();
        w.insert(b"b", b"2");
        let refused = match journal.submit(w) {
            Ok(pending) => pending.durable().await,
            Err(e) => Err(e),
        };
        match refused {
            Err(Error::Unavailable(msg)) => {
                assert!(msg.contains("takes no more requests; restart the coordinator"), "{msg}")
            }
            other => panic!("expected UNAVAILABLE, got {other:?}"),
        }
        assert!(matches!(journal.check(), Err(Error::Unavailable(_))), "reads are refused too");
        assert_eq!(get(&f.tree, b"b")?, None, "the refused write is not applied");
        drop(journal);
        Ok(())
    }

    #[tokio::test]
    async fn of_two_writes_on_the_same_version_exactly_one_lands() -> Result<()> {
        let f = fixture()?;
        let journal = Journal::open(f.dir.path(), f.db.clone(), f.tree.clone(), TEST_VERSIONING)?;
        let write = |value: &[u8], expected: u64| {
            let mut w = Write::default();
            w.insert(b"k", value);
            w.require(b"k", expected, value[0] as u64);
            w
        };
        journal.submit(write(&[1, b'a'], 0))?.durable().await?;
        // Both based on version 1, queued together (one group) or not.
        let first = journal.submit(write(&[2, b'b'], 1))?;
        let second = journal.submit(write(&[2, b'c'], 1))?;
        let (first, second) = (first.durable().await, second.durable().await);
        assert!(first.is_ok(), "{first:?}");
        match second {
            Err(Error::Storage(msg)) => assert_eq!(msg, "conflict: expected 1, found 2"),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(get(&f.tree, b"k")?, Some(vec![2, b'b']), "the loser wrote nothing");
        // A write based on a version that never existed is refused too.
        let stale = journal.submit(write(&[9, b'z'], 7))?.durable().await;
        assert!(stale.is_err());
        drop(journal);
        let on_disk = generations(f.dir.path())?;
        assert!(on_disk.is_empty());
        assert_eq!(get(&f.tree, b"k")?, Some(vec![2, b'b']));
        Ok(())
    }

    /// Replay over arbitrary bytes and over damaged files: never a panic,
    /// and never a damaged frame accepted. Whatever replay applies is the
    /// file's first frames, in order, exactly as written; otherwise it
    /// reports damage. (`PROPTEST_CASES=100000` for a longer run.)
    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// A frame's operations, owned.
        type OwnedOps = Vec<(Vec<u8>, Option<Vec<u8>>)>;

        /// The state after applying `frames` to an empty tree, as a map.
        fn state_after(frames: &[OwnedOps]) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
            let mut state = std::collections::BTreeMap::new();
            for ops in frames {
                for (k, v) in ops {
                    match v {
                        Some(v) => state.insert(k.clone(), v.clone()),
                        None => state.remove(k),
                    };
                }
            }
            state
        }

        fn contents(tree: &sled::Tree) -> std::collections::BTreeMap<Vec<u8>, Vec<u8>> {
            tree.iter().filter_map(|r| r.ok()).map(|(k, v)| (k.to_vec(), v.to_vec())).collect()
        }

        fn ops() -> impl Strategy<Value = OwnedOps> {
            proptest::collection::vec(
                (
                    proptest::collection::vec(0u8..4, 1..3),
                    proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
                ),
                1..4,
            )
        }

        #[derive(Debug, Clone)]
        enum Damage {
            Flip { at: usize, mask: u8 },
            Zero { at: usize, len: usize },
            Cut { at: usize },
        }

        fn damage() -> impl Strategy<Value = Damage> {
            prop_oneof![
                (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Damage::Flip { at, mask }),
                (any::<usize>(), 1usize..600).prop_map(|(at, len)| Damage::Zero { at, len }),
                any::<usize>().prop_map(|at| Damage::Cut { at }),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048), legacy in any::<bool>()) {
                let f = fixture().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let format = if legacy { Format::Legacy } else { Format::Grouped };
                let path = format_path(f.dir.path(), 1, format);
                std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                match replay(&path, 1, format, &f.tree, 0, None) {
                    Ok(_) | Err(Error::Corrupt { .. }) => {}
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
            }

            #[test]
            fn a_damaged_file_replays_a_true_prefix_or_is_refused(
                frames in proptest::collection::vec(ops(), 1..12),
                damage in damage(),
            ) {
                let f = fixture().map_err(|e| TestCaseError::fail(e.to_string()))?;
                let path = file_path(f.dir.path(), 1);
                let borrowed: Vec<Vec<Op<'_>>> =
                    frames.iter().map(|ops| ops.iter().map(|(k, v)| (k.as_slice(), v.as_deref())).collect()).collect();
                let refs: Vec<Ops<'_>> = borrowed.iter().map(|o| o.as_slice()).collect();
                let (mut bytes, _) = file_of(1, &refs);
                match damage {
                    Damage::Flip { at, mask } => {
                        let at = at % bytes.len();
                        bytes[at] ^= mask;
                    }
                    Damage::Zero { at, len } => {
                        let at = at % bytes.len();
                        let end = (at + len).min(bytes.len());
                        bytes[at..end].fill(0);
                    }
                    Damage::Cut { at } => bytes.truncate(at % bytes.len()),
                }
                std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
                match replay(&path, 1, Format::Grouped, &f.tree, SMALL, None) {
                    Ok(replayed) => {
                        let n = replayed.frames as usize;
                        prop_assert!(n <= frames.len());
                        prop_assert_eq!(contents(&f.tree), state_after(&frames[..n]), "applied {} frames", n);
                    }
                    Err(Error::Corrupt { .. }) => {}
                    Err(other) => prop_assert!(false, "unexpected error {other}"),
                }
            }
        }
    }
}
