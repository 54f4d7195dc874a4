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
//! **Frames** are `len: u32 LE | crc32(generation, payload): u32 LE |
//! payload`, the payload a list of operations `1 | key_len: u32 | key |
//! value_len: u32 | value` (insert) or `2 | key_len: u32 | key` (remove).
//! A file's frames end at the first frame that is incomplete or fails its
//! checksum: past it lies an interrupted write (never acknowledged) or what
//! a recycled file held before, whose frames carry an older generation in
//! their checksum. Generations only grow within a run, and a spare left by
//! an earlier run is deleted at open, so an old frame never passes. A bad
//! frame *followed by a valid one* is damage to acknowledged data, and
//! opening fails ([`Error::Corrupt`]) rather than lose it silently.
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
pub const FILE_PREFIX: &str = "tcc-journal-";

/// A checkpointed journal file kept for reuse by the next rotation:
/// overwriting allocated blocks lets `fdatasync` skip the inode update an
/// append needs, which halves its latency on ext4.
pub const SPARE_NAME: &str = "tcc-journal.spare";

/// Empty the journal into sled at least this often while writes come in,
/// which bounds the replay work at start-up.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);

/// ... or once the journal holds this many bytes.
pub const CHECKPOINT_BYTES: u64 = 64 * 1024 * 1024;

const HEADER: usize = 8;
const OP_INSERT: u8 = 1;
const OP_REMOVE: u8 = 2;

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

/// The checksum of a frame in the journal file of `generation`. Covering
/// the generation makes frames left over from a recycled file's previous
/// use fail it.
fn checksum(generation: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&generation.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// Sets a sealed frame's checksum for the file of `generation`.
fn stamp(frame: &mut [u8], generation: u64) {
    let crc = checksum(generation, &frame[HEADER..]);
    frame[4..HEADER].copy_from_slice(&crc.to_le_bytes());
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

/// The journal and its two threads. See the module docs.
pub struct Journal {
    shared: Arc<Shared>,
    flusher: Option<JoinHandle<()>>,
    checkpointer: Option<JoinHandle<()>>,
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
    pub fn open(dir: &Path, db: sled::Db, tree: sled::Tree, versioning: Versioning) -> Result<Self> {
        Self::open_with(dir, db, tree, versioning, CHECKPOINT_BYTES)
    }

    /// [`Journal::open`] with a checkpoint after `checkpoint_bytes` (tests
    /// use a small one to rotate on every write).
    fn open_with(
        dir: &Path,
        db: sled::Db,
        tree: sled::Tree,
        versioning: Versioning,
        checkpoint_bytes: u64,
    ) -> Result<Self> {
        match std::fs::remove_file(spare_path(dir)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(io_error("cannot remove", &spare_path(dir), e));
            }
            _ => {}
        }
        let found = generations(dir)?;
        let mut frames = 0;
        for generation in &found {
            frames += replay(&file_path(dir, *generation), *generation, &tree)?.frames;
        }
        let generation = match found.last() {
            Some(last) => {
                db.flush().map_err(|e| Error::Storage(format!("sled flush: {e}")))?;
                tracing::info!(frames, files = found.len(), "replayed the journal into sled");
                last + 1
            }
            None => 1,
        };
        let file = create(dir, generation)?;
        remove_up_to(dir, generation - 1, false).map_err(Error::Storage)?;

        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            failed: AtomicBool::new(false),
            failure: tokio::sync::watch::channel(None).0,
            checkpointing: AtomicBool::new(false),
        });
        let (checkpoints, requests) = mpsc::channel();
        let checkpointer = {
            let (shared, dir) = (shared.clone(), dir.to_path_buf());
            spawn("tcc-checkpoint", move || checkpointer(&shared, &db, &dir, &requests))?
        };
        let flusher = Flusher {
            shared: shared.clone(),
            tree,
            versioning,
            dir: dir.to_path_buf(),
            file,
            generation,
            size: 0,
            last_checkpoint: Instant::now(),
            checkpoint_bytes,
            checkpoints,
        };
        let flusher = spawn("tcc-journal", move || flusher.run())?;
        Ok(Journal { shared, flusher: Some(flusher), checkpointer: Some(checkpointer) })
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

impl Drop for Journal {
    fn drop(&mut self) {
        lock(&self.shared.queue).stop = true;
        self.shared.wake.notify_one();
        // The flusher writes what is queued, asks for a last checkpoint and
        // hangs up; the checkpointer runs it and exits.
        for t in [self.flusher.take(), self.checkpointer.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn fail(&self, cause: String) {
        tracing::error!(%cause, "the store failed to write; refusing further requests until restart");
        let mut q = lock(&self.queue);
        for e in q.entries.drain(..) {
            let _ = e.done.send(Err(poisoned(&cause)));
        }
        q.failed = Some(cause.clone());
        self.failed.store(true, Ordering::Release);
        self.failure.send_replace(Some(cause));
    }
}

fn poisoned(cause: &str) -> Error {
    Error::Unavailable(format!(
        "the store failed to write ({cause}) and takes no more requests; restart the coordinator"
    ))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("{what} the journal {}: {e}", path.display()))
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::Storage(format!("cannot start the {name} thread: {e}")))
}

// --- files ---------------------------------------------------------------

fn file_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{FILE_PREFIX}{generation:016}"))
}

/// The generations of the journal files in `dir`, oldest first.
fn generations(dir: &Path) -> Result<Vec<u64>> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("cannot list", dir, e))?;
    let mut found = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error("cannot list", dir, e))?;
        if let Some(generation) =
            entry.file_name().to_str().and_then(|n| n.strip_prefix(FILE_PREFIX)).and_then(|g| g.parse().ok())
        {
            found.push(generation);
        }
    }
    found.sort_unstable();
    Ok(found)
}

fn spare_path(dir: &Path) -> PathBuf {
    dir.join(SPARE_NAME)
}

/// Creates the journal file of `generation`, written from its start: the
/// spare (a checkpointed file kept for reuse) renamed, or a new file. Then
/// makes the directory entry durable, so that frames synced into the file
/// are found after a crash.
fn create(dir: &Path, generation: u64) -> Result<File> {
    let path = file_path(dir, generation);
    let file = match std::fs::rename(spare_path(dir), &path) {
        Ok(()) => OpenOptions::new().write(true).open(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            OpenOptions::new().create_new(true).write(true).open(&path)
        }
        Err(e) => Err(e),
    }
    .map_err(|e| io_error("cannot create", &path, e))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io_error("cannot sync the directory of", &path, e))?;
    Ok(file)
}

/// Removes the journal files up to `generation`, keeping the newest of them
/// as the spare when `recycle` is set.
fn remove_up_to(dir: &Path, generation: u64, recycle: bool) -> std::result::Result<(), String> {
    let done: Vec<u64> =
        generations(dir).map_err(|e| e.to_string())?.into_iter().filter(|g| *g <= generation).collect();
    for (i, g) in done.iter().enumerate() {
        let path = file_path(dir, *g);
        let result = if recycle && i + 1 == done.len() {
            std::fs::rename(&path, spare_path(dir))
        } else {
            std::fs::remove_file(&path)
        };
        result.map_err(|e| format!("cannot retire {}: {e}", path.display()))?;
    }
    Ok(())
}

// --- threads -------------------------------------------------------------

struct Flusher {
    shared: Arc<Shared>,
    tree: sled::Tree,
    versioning: Versioning,
    dir: PathBuf,
    file: File,
    generation: u64,
    /// Bytes in the current journal file.
    size: u64,
    last_checkpoint: Instant,
    checkpoint_bytes: u64,
    checkpoints: mpsc::Sender<u64>,
}

impl Flusher {
    fn run(mut self) {
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
            if !entries.is_empty()
                && let Err(cause) = self.commit(entries, &mut buf)
            {
                self.shared.fail(cause);
                return;
            }
            if stop {
                // The last checkpoint covers the current file as well; the
                // checkpointer exits once this sender is gone.
                let _ = self.checkpoints.send(self.generation);
                return;
            }
            let due = self.size >= self.checkpoint_bytes
                || (self.size > 0 && self.last_checkpoint.elapsed() >= CHECKPOINT_EVERY);
            if due
                && !self.shared.checkpointing.load(Ordering::Acquire)
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
                        Err(err) => return Err(format!("sled read: {err}")),
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
            stamp(&mut e.write.frame, self.generation);
            buf.extend_from_slice(&e.write.frame);
        }
        let synced = self.file.write_all(buf).and_then(|()| self.file.sync_data());
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
                for done in answers.into_iter().chain(refused.into_iter().map(|(done, _)| done)) {
                    let _ = done.send(Err(poisoned(&cause)));
                }
                Err(cause)
            }
        }
    }

    /// Continues in a new journal file and hands the old one to the
    /// checkpointer: everything in it is already applied to sled.
    fn rotate(&mut self) -> std::result::Result<(), String> {
        let next = self.generation + 1;
        self.file = create(&self.dir, next).map_err(|e| e.to_string())?;
        let done = std::mem::replace(&mut self.generation, next);
        self.size = 0;
        self.last_checkpoint = Instant::now();
        self.shared.checkpointing.store(true, Ordering::Release);
        self.checkpoints.send(done).map_err(|_| "the checkpoint thread is gone".to_string())
    }
}

/// Runs `Db::flush`, after which sled holds everything in the journal files
/// up to the requested generation, then removes those files.
fn checkpointer(shared: &Shared, db: &sled::Db, dir: &Path, requests: &mpsc::Receiver<u64>) {
    while let Ok(generation) = requests.recv() {
        let done = db.flush().map_err(|e| format!("sled flush: {e}")).and_then(|_| remove_up_to(dir, generation, true));
        shared.checkpointing.store(false, Ordering::Release);
        if let Err(cause) = done {
            shared.fail(cause);
            return;
        }
    }
}

/// What replay found.
#[derive(Debug, PartialEq, Eq)]
struct Replayed {
    frames: u64,
    /// Bytes of an incomplete last group, dropped.
    dropped: usize,
}

/// Applies the frames of the journal file of `generation` to `tree`, up to
/// the first frame that is incomplete or fails its checksum: the end of
/// what was written to it (an interrupted last write, or what a recycled
/// file held before), unless valid frames follow it.
fn replay(path: &Path, generation: u64, tree: &sled::Tree) -> Result<Replayed> {
    let bytes = std::fs::read(path).map_err(|e| io_error("cannot read", path, e))?;
    let damaged = |offset: usize, cause: String| Error::Corrupt {
        key: format!("journal {} at byte {offset}", path.display()),
        cause,
    };
    let mut pos = 0;
    let mut frames = 0;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        match frame(rest, generation) {
            Ok((payload, used)) => {
                apply(tree, payload).map_err(|e| match e {
                    Applied::Malformed(cause) => damaged(pos, cause),
                    Applied::Sled(e) => Error::Storage(e.to_string()),
                })?;
                pos += used;
                frames += 1;
            }
            Err(cause) => {
                if valid_frame_follows(rest, generation) {
                    return Err(damaged(pos, cause));
                }
                tracing::info!(
                    file = %path.display(),
                    offset = pos,
                    bytes = rest.len(),
                    %cause,
                    "end of journal file; the bytes after it were never acknowledged (an interrupted write, or a recycled file's old content)"
                );
                return Ok(Replayed { frames, dropped: rest.len() });
            }
        }
    }
    Ok(Replayed { frames, dropped: 0 })
}

/// Splits one frame off `bytes`: its payload and its length with header.
fn frame(bytes: &[u8], generation: u64) -> std::result::Result<(&[u8], usize), String> {
    let header = bytes.get(..HEADER).ok_or("truncated frame header")?;
    let (len, crc) = (le_u32(header) as usize, le_u32(&header[4..]));
    if len == 0 {
        return Err("empty frame".into());
    }
    let payload = bytes.get(HEADER..HEADER + len).ok_or("truncated frame")?;
    if checksum(generation, payload) != crc {
        return Err("checksum mismatch".into());
    }
    Ok((payload, HEADER + len))
}

/// Whether a valid frame starts after the frame at the start of `bytes`,
/// whose header claims a length that fits: then the bad frame was followed
/// by acknowledged writes and is damage, not a torn tail.
fn valid_frame_follows(bytes: &[u8], generation: u64) -> bool {
    let Some(len) = bytes.get(..4).map(|h| le_u32(h) as usize) else { return false };
    match bytes.get(HEADER + len..) {
        Some(rest) if len > 0 && !rest.is_empty() => frame(rest, generation).is_ok(),
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
        let key = take_bytes(&mut payload).map_err(Applied::Malformed)?;
        match op {
            OP_INSERT => {
                let value = take_bytes(&mut payload).map_err(Applied::Malformed)?;
                tree.insert(key, value)?;
            }
            OP_REMOVE => {
                tree.remove(key)?;
            }
            other => return Err(Applied::Malformed(format!("unknown operation {other}"))),
        }
    }
    Ok(())
}

/// The little-endian u32 at the start of `bytes` (at least 4 long).
fn le_u32(bytes: &[u8]) -> u32 {
    u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
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

    /// A frame as the file of generation 1 holds it.
    fn frame_of(ops: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        frame_in(1, ops)
    }

    fn frame_in(generation: u64, ops: &[(&[u8], Option<&[u8]>)]) -> Vec<u8> {
        let mut w = Write::default();
        for (k, v) in ops {
            match v {
                Some(v) => w.insert(k, v),
                None => w.remove(k),
            }
        }
        match w.seal() {
            Ok(mut sealed) => {
                stamp(&mut sealed.frame, generation);
                sealed.frame
            }
            Err(e) => panic!("seal: {e}"),
        }
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
        let db = sled::Config::new().path(dir.path().join("db")).open().map_err(sled_err)?;
        let tree = db.open_tree("t").map_err(sled_err)?;
        Ok(Fixture { dir, db, tree })
    }

    fn get(tree: &sled::Tree, k: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(tree.get(k).map_err(sled_err)?.map(|v| v.to_vec()))
    }

    fn sled_err(e: sled::Error) -> Error {
        Error::Storage(e.to_string())
    }

    #[test]
    fn replay_applies_frames_in_order_and_twice_is_the_same() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let mut bytes = frame_of(&[(b"a", Some(b"1")), (b"b", Some(b"2"))]);
        bytes.extend(frame_of(&[(b"a", None), (b"b", Some(b"3"))]));
        std::fs::write(&path, &bytes).map_err(io)?;
        // Replaying twice (a crash during recovery) ends in the same state.
        for _ in 0..2 {
            assert_eq!(replay(&path, 1, &f.tree)?, Replayed { frames: 2, dropped: 0 });
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
        let second = frame_of(&[(b"b", Some(b"2"))]);
        for cut in [1, HEADER, second.len() - 1] {
            let mut bytes = first.clone();
            bytes.extend_from_slice(&second[..cut]);
            std::fs::write(&path, &bytes).map_err(io)?;
            assert_eq!(replay(&path, 1, &f.tree)?, Replayed { frames: 1, dropped: cut }, "cut at {cut}");
            assert_eq!(get(&f.tree, b"a")?, Some(b"1".to_vec()));
            assert_eq!(get(&f.tree, b"b")?, None);
        }
        // Zeros after the last write (a torn block) too.
        let mut bytes = first.clone();
        bytes.extend_from_slice(&[0; 64]);
        std::fs::write(&path, &bytes).map_err(io)?;
        assert_eq!(replay(&path, 1, &f.tree)?, Replayed { frames: 1, dropped: 64 });
        Ok(())
    }

    #[test]
    fn damage_before_acknowledged_writes_fails_loudly() -> Result<()> {
        let f = fixture()?;
        let path = file_path(f.dir.path(), 1);
        let mut bytes = frame_of(&[(b"a", Some(b"1"))]);
        let flip = bytes.len() - 1;
        bytes[flip] ^= 0x40;
        bytes.extend(frame_of(&[(b"b", Some(b"2"))]));
        std::fs::write(&path, &bytes).map_err(io)?;
        match replay(&path, 1, &f.tree) {
            Err(Error::Corrupt { key, cause }) => {
                assert_eq!(key, format!("journal {} at byte 0", path.display()));
                assert_eq!(cause, "checksum mismatch");
            }
            other => panic!("expected Corrupt, got {other:?}"),
        }
        assert_eq!(get(&f.tree, b"b")?, None, "nothing after the damage is applied");
        Ok(())
    }

    #[test]
    fn open_replays_every_file_in_generation_order_then_starts_a_new_one() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        std::fs::write(file_path(dir, 7), frame_in(7, &[(b"a", Some(b"old")), (b"b", Some(b"1"))])).map_err(io)?;
        std::fs::write(file_path(dir, 8), frame_in(8, &[(b"a", Some(b"new"))])).map_err(io)?;
        // A spare from an earlier run is never reused: its old frames could
        // carry the generation numbers this run starts again from.
        std::fs::write(spare_path(dir), frame_in(9, &[(b"c", Some(b"stale"))])).map_err(io)?;
        let journal = Journal::open(dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING)?;
        assert_eq!(get(&f.tree, b"a")?, Some(b"new".to_vec()));
        assert_eq!(get(&f.tree, b"b")?, Some(b"1".to_vec()));
        assert_eq!(generations(dir)?, vec![9], "replayed files removed once sled is flushed");
        assert_eq!(std::fs::metadata(file_path(dir, 9)).map_err(io)?.len(), 0, "a new, empty file");
        drop(journal);
        assert_eq!(get(&f.tree, b"c")?, None);
        Ok(())
    }

    #[test]
    fn a_recycled_file_replays_only_what_its_new_generation_wrote() -> Result<()> {
        let f = fixture()?;
        let dir = f.dir.path();
        let mut old = create(dir, 1)?;
        old.write_all(&frame_in(1, &[(b"a", Some(b"1")), (b"b", Some(b"2"))])).map_err(io)?;
        old.write_all(&frame_in(1, &[(b"c", Some(b"3"))])).map_err(io)?;
        drop(old);
        remove_up_to(dir, 1, true).map_err(Error::Storage)?;
        assert_eq!(generations(dir)?, Vec::<u64>::new());
        let mut new = create(dir, 2)?;
        assert!(std::fs::metadata(file_path(dir, 2)).map_err(io)?.len() > 0, "the spare was reused");
        new.write_all(&frame_in(2, &[(b"a", Some(b"9"))])).map_err(io)?;
        let replayed = replay(&file_path(dir, 2), 2, &f.tree)?;
        assert_eq!(replayed.frames, 1);
        assert_eq!(get(&f.tree, b"a")?, Some(b"9".to_vec()));
        assert_eq!(get(&f.tree, b"b")?, None);
        assert_eq!(get(&f.tree, b"c")?, None, "an old frame, intact but of generation 1, is not replayed");
        Ok(())
    }

    #[tokio::test]
    async fn an_acknowledged_write_is_in_the_journal_and_in_sled() -> Result<()> {
        let f = fixture()?;
        let journal = Journal::open(f.dir.path(), f.db.clone(), f.tree.clone(), TEST_VERSIONING)?;
        let mut w = Write::default();
        w.insert(b"k", b"v");
        w.remove(b"gone");
        journal.submit(w)?.durable().await?;
        assert_eq!(get(&f.tree, b"k")?, Some(b"v".to_vec()), "applied to sled once acknowledged");
        // On disk before any checkpoint: what replay would find after a crash.
        let on_disk = std::fs::read(file_path(f.dir.path(), 1)).map_err(io)?;
        assert_eq!(on_disk, frame_of(&[(b"k", Some(b"v")), (b"gone", None)]));
        // A clean close checkpoints and removes the journal.
        drop(journal);
        assert_eq!(generations(f.dir.path())?, Vec::<u64>::new());
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
        let journal = Journal::open_with(&dir, f.db.clone(), f.tree.clone(), TEST_VERSIONING, 1)?;
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
}
