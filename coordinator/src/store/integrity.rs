//! Damage detection for the embedded store's files (sled's `conf`, `db`
//! and snapshots, beside the journal, which checks its own frames).
//!
//! sled notices some damage itself (a checksum), panics on other damage
//! ("tried to serialize Uninitialized"), and takes yet other damage, such as
//! a `db` file cut short, for the end of its log and opens with fewer
//! records. So opening the store:
//!
//! * refuses a data directory that has held a store ([`IDENTITY`]) but
//!   lacks one of sled's files;
//! * turns a panic inside sled into [`Error::Corrupt`], with sled's message
//!   ([`catching_panics`]), never a crash;
//! * reads every record once and decodes it (so damage is found at start,
//!   not by a request later), summing them into a [`Summary`];
//! * after a clean close, compares that summary with the one the close
//!   recorded ([`MANIFEST`]): fewer records, or different bytes, is damage.
//!   The manifest is removed once the store is open, before the first
//!   write could make it stale (so while it exists it describes the
//!   records, even if a start was interrupted after the close); after a
//!   crash there is none, and the checkpoint marker (see the journal) is
//!   what catches a sled that lost durable writes.
//!
//! After a crash, the journal's checkpoint marker (set inside sled, and
//! recorded in a file once sled's flush is done) catches a sled that lost
//! writes it had made durable. What neither sees: damage that sled takes
//! for a shorter log without reaching back before the last checkpoint.
//! RELIABILITY.md says so.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write as _;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::sync::Once;

use crate::error::{Error, Result};

/// Written once into a data directory that holds a store: from then on,
/// sled's files must be there.
pub const IDENTITY: &str = "tcc-data-dir";

/// The summary of the store's records at the last clean close.
pub const MANIFEST: &str = "tcc-manifest";

/// The files of sled that a store always has.
pub const SLED_FILES: [&str; 2] = ["conf", "db"];

/// Free space a start needs beyond the journal it replays: room for sled
/// to take the replayed writes and write its snapshot, and for the first
/// writes of the new journal file.
pub const START_SPACE: u64 = 16 << 20;

const MIB: u64 = 1 << 20;

/// How many records, how many bytes, and a checksum of them in key order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records (keys).
    pub records: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
    /// CRC-32 of every key and value with their lengths, in key order.
    pub crc: u32,
}

/// Builds a [`Summary`] from records in key order.
#[derive(Default)]
pub struct Summing {
    summary: Summary,
    crc: crc32fast::Hasher,
}

impl Summing {
    /// Adds the next record.
    pub fn add(&mut self, key: &[u8], value: &[u8]) {
        self.summary.records += 1;
        self.summary.bytes += (key.len() + value.len()) as u64;
        for part in [key, value] {
            self.crc.update(&(part.len() as u64).to_le_bytes());
            self.crc.update(part);
        }
    }

    /// The summary of the records added.
    pub fn finish(self) -> Summary {
        Summary { crc: self.crc.finalize(), ..self.summary }
    }
}

impl Summary {
    fn encode(&self) -> String {
        format!("records={} bytes={} crc={:08x}\n", self.records, self.bytes, self.crc)
    }

    fn decode(text: &str) -> Option<Summary> {
        let mut fields = text.trim().split(' ');
        let mut field = |name: &str| fields.next().and_then(|f| f.strip_prefix(name)).map(str::to_owned);
        let records = field("records=")?.parse().ok()?;
        let bytes = field("bytes=")?.parse().ok()?;
        let crc = u32::from_str_radix(&field("crc=")?, 16).ok()?;
        Some(Summary { records, bytes, crc })
    }
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Storage(format!("{what} {}: {e}", path.display()))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| io("cannot sync the directory", dir, e))
}

/// Refuses a data directory that has held a store but lacks one of sled's
/// files (sled would create an empty database in its place).
pub fn check_files(dir: &Path) -> Result<()> {
    if !dir.join(IDENTITY).exists() {
        return Ok(());
    }
    for name in SLED_FILES {
        let path = dir.join(name);
        if !path.exists() {
            return Err(Error::Corrupt {
                key: format!("sled file {}", path.display()),
                cause: format!(
                    "it is missing from a data directory that holds a store ({IDENTITY} is there); restore the data directory from a backup"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses a start without the free space it needs ([`START_SPACE`] plus
/// `journal`, the bytes of journal to replay) on the file system of `dir`,
/// before anything is written: a start on a full disk ends at once, saying
/// how much it needs and where, and changes nothing.
pub fn check_space(dir: &Path, journal: u64) -> Result<()> {
    let free = free_space(dir)?;
    if free >= START_SPACE + journal {
        return Ok(());
    }
    Err(Error::Unavailable(no_space(dir, free, journal)))
}

/// The message for a start short of space (also after a write at start
/// failed with ENOSPC).
fn no_space(dir: &Path, free: u64, journal: u64) -> String {
    let needed = START_SPACE + journal;
    format!(
        "not enough free space to start: {} MiB free on the file system of {}, and a start needs {} MiB ({} MiB of journal to replay plus {} MiB); free space there and start again (nothing acknowledged is lost)",
        free / MIB,
        dir.display(),
        needed.div_ceil(MIB),
        journal.div_ceil(MIB),
        START_SPACE / MIB,
    )
}

/// If `e` is a failed write for want of space, the error that says how much
/// a start needs (`journal`: as for [`check_space`]), and where; otherwise
/// `e`.
pub fn explain_no_space(dir: &Path, journal: u64, e: Error) -> Error {
    let text = e.to_string();
    if !(text.contains("No space left on device") || text.contains("os error 28")) {
        return e;
    }
    match free_space(dir) {
        Ok(free) => Error::Unavailable(format!("{} (the write failed: {text})", no_space(dir, free, journal))),
        Err(_) => e,
    }
}

/// Bytes free to an unprivileged user on the file system of `dir`.
fn free_space(dir: &Path) -> Result<u64> {
    let stat = rustix::fs::statvfs(dir)
        .map_err(|e| Error::Storage(format!("cannot read the free space of {}: {e}", dir.display())))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Removes what a start interrupted by a full disk may leave of sled's
/// snapshot: `snap.*.generating`, written before it is renamed into place,
/// so never a complete snapshot. sled 0.34 would take one for the newest
/// snapshot and refuse an empty one as damage.
pub fn remove_unfinished_snapshots(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| io("cannot list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io("cannot list", dir, e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("snap.") && name.ends_with(".generating") {
            let path = entry.path();
            std::fs::remove_file(&path).map_err(|e| io("cannot remove", &path, e))?;
            tracing::info!(file = %path.display(), "removed an unfinished sled snapshot (a start was interrupted)");
        }
    }
    Ok(())
}

/// Marks `dir` as holding a store (once sled's files exist).
pub fn mark(dir: &Path) -> Result<()> {
    let path = dir.join(IDENTITY);
    if path.exists() {
        return Ok(());
    }
    std::fs::write(&path, b"a tcc-coordinator data directory\n").map_err(|e| io("cannot write", &path, e))?;
    File::open(&path).and_then(|f| f.sync_all()).map_err(|e| io("cannot sync", &path, e))?;
    sync_dir(dir)
}

/// The summary the last clean close recorded, if any.
pub fn read_manifest(dir: &Path) -> Result<Option<Summary>> {
    let path = dir.join(MANIFEST);
    match std::fs::read_to_string(&path) {
        Ok(text) => Summary::decode(&text).map(Some).ok_or_else(|| Error::Corrupt {
            key: format!("manifest {}", path.display()),
            cause: format!("cannot read {text:?}; restore the data directory from a backup"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io("cannot read", &path, e)),
    }
}

/// Records `summary` durably.
pub fn write_manifest(dir: &Path, summary: &Summary) -> Result<()> {
    replace_durably(dir, MANIFEST, summary.encode().as_bytes()).map_err(|e| io("cannot write", &dir.join(MANIFEST), e))
}

/// Replaces the file `name` in `dir` with `bytes`, all or nothing, and
/// durably: written aside, synced, renamed, the directory synced.
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{name}.new"));
    File::create(&tmp).and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir).and_then(|d| d.sync_all())
}

/// Removes the manifest durably: the store is about to change.
pub fn remove_manifest(dir: &Path) -> Result<()> {
    let path = dir.join(MANIFEST);
    match std::fs::remove_file(&path) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io("cannot remove", &path, e)),
    }
}

/// Compares what the store holds with what the last clean close recorded.
pub fn compare(dir: &Path, recorded: &Summary, found: &Summary) -> Result<()> {
    if recorded == found {
        return Ok(());
    }
    Err(Error::Corrupt {
        key: format!("sled database in {}", dir.display()),
        cause: format!(
            "it holds {} records ({} bytes) where the last clean shutdown left {} ({} bytes){}: sled's files were damaged or replaced while the coordinator was stopped; restore the data directory from a backup",
            found.records,
            found.bytes,
            recorded.records,
            recorded.bytes,
            if found.records == recorded.records && found.bytes == recorded.bytes {
                ", with different content"
            } else {
                ""
            },
        ),
    })
}

thread_local! {
    /// `Some` while this thread runs [`catching_panics`]: the panic's
    /// message, captured instead of printed.
    static CAPTURED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Runs `f`, turning a panic (sled's reaction to some damage) into
/// [`Error::Corrupt`] about `what`, with the panic's message. The message is
/// not printed: the error says it.
pub fn catching_panics<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let captured = CAPTURED.with(|c| match c.borrow_mut().as_mut() {
                Some(slot) => {
                    *slot = info.to_string();
                    true
                }
                None => false,
            });
            if !captured {
                previous(info);
            }
        }));
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(String::new()));
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    let message = CAPTURED.with(|c| c.borrow_mut().take()).unwrap_or_default();
    result.unwrap_or_else(|_| {
        Err(Error::Corrupt {
            key: what.to_string(),
            cause: format!("sled could not read it ({message}); restore the data directory from a backup"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_summary_reads_back_and_a_difference_is_named() {
        let mut s = Summing::default();
        s.add(b"a", b"1");
        s.add(b"b", b"22");
        let summary = s.finish();
        assert_eq!(Summary::decode(&summary.encode()), Some(summary));
        assert_eq!(Summary::decode("records=x"), None);
        let fewer = Summary { records: 1, ..summary };
        let dir = Path::new("/data");
        assert!(compare(dir, &summary, &summary).is_ok());
        match compare(dir, &summary, &fewer) {
            Err(Error::Corrupt { cause, .. }) => assert!(cause.starts_with("it holds 1 records"), "{cause}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panic_becomes_corrupt_with_its_message() {
        let r: Result<()> = catching_panics("sled database in /x", || panic!("tried to serialize Uninitialized"));
        match r {
            Err(Error::Corrupt { key, cause }) => {
                assert_eq!(key, "sled database in /x");
                assert!(cause.contains("tried to serialize Uninitialized"), "{cause}");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(catching_panics("x", || Ok(7)).ok(), Some(7));
    }
}
