//! The one way eio writes a file: [`write_atomically`] (and [`append_atomically`] on top of it).
//!
//! # The guarantee
//! The new bytes go to a temporary file in the target's folder (`.<name>.<pid>@<host>.<n>.tmp`),
//! which is fsynced, renamed over the target, and the folder fsynced. So at any instant the
//! target holds either its previous version or the complete new one:
//! * a process killed at any point (SIGKILL, power loss after the folder sync) leaves the old
//!   file or the new one, never a torn one; at worst a stale temporary file, which the next
//!   write of that file, or the next run of that folder ([`remove_stale_temporaries`]),
//!   removes;
//! * a failed write (disk full, read-only folder, a file where the folder should be) removes its
//!   temporary file, leaves the previous version untouched, and returns an [`io::Error`] of the
//!   same [`io::ErrorKind`] whose message names the file and the OS reason.
//!
//! The folder is created when missing. Its fsync after the rename is best effort: the rename
//! has happened by then, and some file systems cannot sync a folder.
//!
//! A temporary file is *stale* when the process that wrote it is gone: same host and its pid is
//! not running (or the file is older than [`STALE_AFTER`]), or another host and older than
//! [`STALE_AFTER`] (shards of a black-box suite may share one folder across machines, so a
//! temporary file of a live writer elsewhere is never removed early).
//!
//! # Fault injection
//! Tests prove the guarantee through this same code path: a [`fault::Fault`] armed on the
//! current thread (or, for a whole `eio` process, the environment variable `EIO_TEST_FAULT`,
//! see [`fault`]) makes the N-th matching write fail (or kill the process) at a chosen step,
//! e.g. after a given number of bytes.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Age after which any temporary file is stale, whoever wrote it (no write takes this long).
pub const STALE_AFTER: Duration = Duration::from_secs(24 * 60 * 60);

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Writes `bytes` to `path` atomically: temporary file in the same folder, fsync, rename,
/// fsync of the folder (see the [module documentation](self)). Stale temporary files of the
/// same target are removed first.
///
/// # Errors
/// Any I/O failure, as an [`io::Error`] of the OS error's kind whose message names `path`
/// and the OS reason; the previous version of `path` is untouched and no temporary file is
/// left.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let folder = folder_of(path);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a file name", path.display()),
            )
        })?;
    fs::create_dir_all(&folder).map_err(|e| {
        named(
            e,
            format!(
                "cannot create the folder {} for {}",
                folder.display(),
                path.display()
            ),
        )
    })?;
    remove_stale(&folder, Some(&file_name));
    let mut armed = fault::take(&file_name);
    let tmp = folder.join(format!(
        ".{file_name}.{}@{}.{}.tmp",
        std::process::id(),
        host(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let created = armed
        .strike(fault::Step::Create, 0)
        .and_then(|()| File::create(&tmp));
    let mut file = created.map_err(|e| {
        named(
            e,
            format!(
                "{}: cannot create the temporary file {}",
                path.display(),
                tmp.display()
            ),
        )
    })?;
    let written = write_through(&mut file, bytes, &mut armed)
        .and_then(|()| armed.strike(fault::Step::Sync, bytes.len() as u64))
        .and_then(|()| file.sync_all());
    drop(file);
    let renamed = written
        .and_then(|()| armed.strike(fault::Step::Rename, bytes.len() as u64))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = renamed {
        let removed = match fs::remove_file(&tmp) {
            Ok(()) => "removed".to_string(),
            Err(r) => format!("could not be removed: {r}"),
        };
        return Err(named(
            e,
            format!(
                "cannot write {} (its temporary file {} {removed}; the previous version is untouched)",
                path.display(),
                tmp.display()
            ),
        ));
    }
    // The rename is durable once the folder itself is synced (best effort: the new file is in
    // place either way, and some file systems cannot sync a folder).
    if let Ok(dir) = File::open(&folder) {
        let _ = dir.sync_all();
    }
    Ok(())
}

/// Appends `bytes` to `path` by rewriting it atomically ([`write_atomically`] of the old
/// contents followed by `bytes`), so an append is never torn. Meant for small files such as
/// `metrics.jsonl` (one line per epoch).
///
/// # Errors
/// As [`write_atomically`], or the old contents cannot be read (named).
pub fn append_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut all = match fs::read(path) {
        Ok(old) => old,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(named(e, format!("cannot read {}", path.display()))),
    };
    all.extend_from_slice(bytes);
    write_atomically(path, &all)
}

/// Removes the stale temporary files (see the [module documentation](self)) in `folder` (not
/// its subfolders); returns how many. A missing folder has none.
///
/// # Errors
/// The folder cannot be listed, or a stale file cannot be removed (named).
pub fn remove_stale_temporaries(folder: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(named(e, format!("cannot list {}", folder.display()))),
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        if is_stale(&path) {
            match fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(named(
                        e,
                        format!("cannot remove the stale temporary file {}", path.display()),
                    ))
                }
            }
        }
    }
    Ok(removed)
}

/// A temporary file name of [`write_atomically`], parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Temporary {
    /// The file it was to replace.
    pub target: String,
    pub pid: u32,
    /// The writer's host; `None` for the older form `.<name>.<pid>.tmp`, taken as this host.
    pub host: Option<String>,
}

impl Temporary {
    /// Parses `.<name>.<pid>@<host>.<n>.tmp` or the older `.<name>.<pid>.tmp`.
    pub fn parse(file_name: &str) -> Option<Temporary> {
        let inner = file_name.strip_prefix('.')?.strip_suffix(".tmp")?;
        let (rest, last) = inner.rsplit_once('.')?;
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if let Some((target, writer)) = rest.rsplit_once('.') {
            if let Some((pid, host)) = writer.split_once('@') {
                if digits(last) && digits(pid) && !target.is_empty() {
                    return Some(Temporary {
                        target: target.to_string(),
                        pid: pid.parse().ok()?,
                        host: Some(host.to_string()),
                    });
                }
            }
        }
        if !digits(last) || rest.is_empty() {
            return None;
        }
        Some(Temporary {
            target: rest.to_string(),
            pid: last.parse().ok()?,
            host: None,
        })
    }
}

/// Whether `path` is a temporary file of [`write_atomically`] whose writer is gone.
pub fn is_stale(path: &Path) -> bool {
    let Some(t) = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(Temporary::parse)
    else {
        return false;
    };
    let old = fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|m| m.elapsed().ok())
        .is_some_and(|age| age > STALE_AFTER);
    let here = t.host.as_deref().is_none_or(|h| h == host());
    old || (here && !process_alive(t.pid))
}

fn remove_stale(folder: &Path, target: Option<&str>) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(t) = name.to_str().and_then(Temporary::parse) else {
            continue;
        };
        if target.is_none_or(|n| n == t.target) && is_stale(&entry.path()) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

fn process_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence only; EPERM means it exists under another user.
    // SAFETY: kill with signal 0 sends nothing.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// This host's name, reduced to `[A-Za-z0-9-]` (other bytes become `_`).
fn host() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let mut buf = [0u8; 256];
        // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
        // truncates (handled by the search for NUL below).
        let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let name = if r == 0 {
            let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
            String::from_utf8_lossy(&buf[..end]).into_owned()
        } else {
            String::new()
        };
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if clean.is_empty() {
            "localhost".into()
        } else {
            clean
        }
    })
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// `e` with `context` and the OS reason in its message, same kind.
fn named(e: io::Error, context: String) -> io::Error {
    io::Error::new(e.kind(), format!("{context}: {e}"))
}

fn write_through(file: &mut File, bytes: &[u8], armed: &mut fault::Armed) -> io::Result<()> {
    match armed.bytes_before_write_fault(bytes.len() as u64) {
        None => file.write_all(bytes),
        Some(n) => {
            file.write_all(&bytes[..n as usize])?;
            // What is written so far reaches the file even when the process is then killed.
            file.flush()?;
            armed.strike(fault::Step::Write { after_bytes: n }, n)
        }
    }
}

/// Planned faults of [`write_atomically`], for tests. Not part of eio's interface.
///
/// On a thread, [`arm`] plans one fault; in a process, `EIO_TEST_FAULT=ACTION:K:STEP[:NAME]`
/// does (read once): ACTION `kill` (the process raises SIGKILL) or `fail` (the write fails
/// with "No space left on device"), K the 0-based count of matching writes to let through
/// first, STEP `create`, `sync`, `rename` or a byte count (after that many bytes of the file,
/// clamped to its length), NAME the target's file name (any file when absent).
#[doc(hidden)]
pub mod fault {
    use std::cell::RefCell;
    use std::io;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;

    /// Where in a write the fault strikes.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Step {
        /// Creating the temporary file (as a read-only folder refuses it).
        Create,
        /// After this many bytes were written (clamped to the file's length).
        Write { after_bytes: u64 },
        /// fsync of the temporary file.
        Sync,
        /// The rename over the target.
        Rename,
    }

    /// What the fault does.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Action {
        /// The step fails with this OS error number (e.g. `libc::ENOSPC`, `libc::EROFS`).
        Fail(i32),
        /// The process kills itself with SIGKILL (what `kill -9` does at that instant).
        Kill,
    }

    /// One planned fault.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Fault {
        /// Only writes of a file of this name count (`None`: every write).
        pub file_name: Option<String>,
        /// Matching writes let through before the one that faults.
        pub skip: usize,
        pub step: Step,
        pub action: Action,
    }

    thread_local! {
        static PLAN: RefCell<Option<Fault>> = const { RefCell::new(None) };
        static FIRED: RefCell<usize> = const { RefCell::new(0) };
    }

    /// Disarms the thread's fault when dropped.
    #[must_use = "the fault is disarmed when the guard is dropped"]
    pub struct Guard(());

    impl Drop for Guard {
        fn drop(&mut self) {
            PLAN.with(|p| p.borrow_mut().take());
        }
    }

    /// Plans `fault` for the writes of the current thread, replacing any planned one.
    pub fn arm(fault: Fault) -> Guard {
        PLAN.with(|p| *p.borrow_mut() = Some(fault));
        Guard(())
    }

    /// Whether the thread's planned fault is still waiting (not struck yet).
    pub fn pending() -> bool {
        PLAN.with(|p| p.borrow().is_some())
    }

    /// How many faults have struck on this thread.
    pub fn fired() -> usize {
        FIRED.with(|f| *f.borrow())
    }

    /// The fault of one write (if this write is the one).
    pub(super) struct Armed(Option<(Step, Action)>);

    impl Armed {
        /// With a write fault: how many bytes to write before it strikes.
        pub(super) fn bytes_before_write_fault(&self, len: u64) -> Option<u64> {
            match self.0 {
                Some((Step::Write { after_bytes }, _)) => Some(after_bytes.min(len)),
                _ => None,
            }
        }

        /// Strikes if the planned fault is at `step` (`written` bytes so far).
        pub(super) fn strike(&mut self, step: Step, written: u64) -> io::Result<()> {
            let at = match (self.0, step) {
                (Some((Step::Write { .. }, a)), Step::Write { .. }) => Some(a),
                (Some((s, a)), _) if s == step => Some(a),
                _ => None,
            };
            let Some(action) = at else {
                return Ok(());
            };
            self.0 = None;
            FIRED.with(|f| *f.borrow_mut() += 1);
            match action {
                Action::Fail(errno) => Err(io::Error::from_raw_os_error(errno)),
                Action::Kill => {
                    eprintln!(
                        "EIO_TEST_FAULT: killing the process at {step:?} ({written} bytes written)"
                    );
                    // SAFETY: raising a signal has no memory-safety preconditions.
                    unsafe {
                        libc::raise(libc::SIGKILL);
                    }
                    unreachable!("SIGKILL cannot be caught")
                }
            }
        }
    }

    /// The fault of the write of `file_name` about to start, counting it against the thread's
    /// and the process's plans.
    pub(super) fn take(file_name: &str) -> Armed {
        let matches = |f: &Fault| f.file_name.as_deref().is_none_or(|n| n == file_name);
        let local = PLAN.with(|p| {
            let mut p = p.borrow_mut();
            match p.as_mut() {
                Some(f) if matches(f) => {
                    if f.skip == 0 {
                        p.take().map(|f| (f.step, f.action))
                    } else {
                        f.skip -= 1;
                        None
                    }
                }
                _ => None,
            }
        });
        if local.is_some() {
            return Armed(local);
        }
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        match process_fault() {
            Some(f) if matches(f) => {
                let n = SEEN.fetch_add(1, Ordering::SeqCst);
                Armed((n == f.skip).then_some((f.step, f.action)))
            }
            _ => Armed(None),
        }
    }

    fn process_fault() -> Option<&'static Fault> {
        static FAULT: OnceLock<Option<Fault>> = OnceLock::new();
        FAULT
            .get_or_init(|| {
                let text = std::env::var("EIO_TEST_FAULT").ok()?;
                let parsed = parse(&text);
                if parsed.is_none() {
                    eprintln!("EIO_TEST_FAULT={text:?} is not ACTION:K:STEP[:NAME]; ignored");
                }
                parsed
            })
            .as_ref()
    }

    /// Parses `ACTION:K:STEP[:NAME]` (see the [module documentation](self)).
    pub fn parse(text: &str) -> Option<Fault> {
        let mut parts = text.splitn(4, ':');
        let action = match parts.next()? {
            "kill" => Action::Kill,
            "fail" => Action::Fail(libc::ENOSPC),
            _ => return None,
        };
        let skip = parts.next()?.parse().ok()?;
        let step = match parts.next()? {
            "create" => Step::Create,
            "sync" => Step::Sync,
            "rename" => Step::Rename,
            n => Step::Write {
                after_bytes: n.parse().ok()?,
            },
        };
        let file_name = parts.next().map(str::to_string);
        Some(Fault {
            file_name,
            skip,
            step,
            action,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("eio-safe-write-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn temporaries(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn a_write_that_fails_after_any_byte_leaves_the_old_file_and_no_temporary() {
        let dir = scratch("bytes");
        let path = dir.join("a.json");
        write_atomically(&path, b"old contents").unwrap();
        let new: Vec<u8> = (0..=255u8).cycle().take(700).collect();
        for n in 0..=new.len() as u64 {
            let _guard = fault::arm(fault::Fault {
                file_name: None,
                skip: 0,
                step: fault::Step::Write { after_bytes: n },
                action: fault::Action::Fail(libc::ENOSPC),
            });
            let e = write_atomically(&path, &new).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
            let text = e.to_string();
            assert!(
                text.contains("a.json") && text.contains("No space left"),
                "{text}"
            );
            assert_eq!(fs::read(&path).unwrap(), b"old contents", "after {n} bytes");
            assert!(temporaries(&dir).is_empty(), "{:?}", temporaries(&dir));
        }
        for step in [fault::Step::Create, fault::Step::Sync, fault::Step::Rename] {
            let _guard = fault::arm(fault::Fault {
                file_name: Some("a.json".into()),
                skip: 0,
                step,
                action: fault::Action::Fail(libc::EIO),
            });
            let e = write_atomically(&path, &new).unwrap_err();
            assert!(e.to_string().contains("a.json"), "{e}");
            assert_eq!(fs::read(&path).unwrap(), b"old contents", "{step:?}");
            assert!(temporaries(&dir).is_empty(), "{step:?}");
        }
        write_atomically(&path, &new).unwrap();
        assert_eq!(fs::read(&path).unwrap(), new);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn faults_count_matching_writes_and_strike_once() {
        let dir = scratch("count");
        let _guard = fault::arm(fault::Fault {
            file_name: Some("b".into()),
            skip: 1,
            step: fault::Step::Write { after_bytes: 1 },
            action: fault::Action::Fail(libc::ENOSPC),
        });
        let before = fault::fired();
        write_atomically(&dir.join("a"), b"xx").unwrap();
        write_atomically(&dir.join("b"), b"xx").unwrap();
        assert!(write_atomically(&dir.join("b"), b"yy").is_err());
        write_atomically(&dir.join("b"), b"zz").unwrap();
        assert_eq!(fault::fired() - before, 1);
        assert!(!fault::pending());
        assert_eq!(fs::read(dir.join("b")).unwrap(), b"zz");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_folders_are_created_and_a_file_in_the_way_is_named() {
        let dir = scratch("folders");
        let deep = dir.join("x/y/z/file.txt");
        write_atomically(&deep, b"1").unwrap();
        assert_eq!(fs::read(&deep).unwrap(), b"1");
        let blocker = dir.join("blocker");
        fs::write(&blocker, b"a file, not a folder").unwrap();
        let e = write_atomically(&blocker.join("file.txt"), b"1").unwrap_err();
        assert!(e.to_string().contains("blocker"), "{e}");
        assert_eq!(fs::read(&blocker).unwrap(), b"a file, not a folder");
        let e = write_atomically(&blocker.join("sub/file.txt"), b"1").unwrap_err();
        assert!(e.to_string().contains("blocker"), "{e}");
        // A folder where the file should be: the rename fails, the temporary file is removed.
        let folder = dir.join("taken");
        fs::create_dir(&folder).unwrap();
        let e = write_atomically(&folder, b"1").unwrap_err();
        assert!(e.to_string().contains("taken"), "{e}");
        assert!(temporaries(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_only_folder_is_refused_with_the_file_named() {
        let dir = scratch("readonly");
        let path = dir.join("eval.json");
        write_atomically(&path, b"old").unwrap();
        // Simulated (EROFS at creation), which holds even for root.
        let _guard = fault::arm(fault::Fault {
            file_name: None,
            skip: 0,
            step: fault::Step::Create,
            action: fault::Action::Fail(libc::EROFS),
        });
        let e = write_atomically(&path, b"new").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ReadOnlyFilesystem);
        assert!(e.to_string().contains("eval.json"), "{e}");
        drop(_guard);
        // A real read-only folder (root ignores the mode bits, so then it is skipped).
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o555)).unwrap();
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            eprintln!("skipped: a real read-only folder (running as root, which may write there)");
        } else {
            let e = write_atomically(&path, b"new").unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("eval.json"), "{e}");
        }
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"old");
        assert!(temporaries(&dir).is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn stale_temporaries_are_removed_and_live_ones_kept() {
        let dir = scratch("stale");
        // No process has a pid this large (Linux's pid_max is at most 2^22).
        let dead = 1u32 << 30;
        let mine = std::process::id();
        let me = host();
        let names = [
            format!(".checkpoint.safetensors.{dead}.tmp"), // the older form: stale
            format!(".metrics.jsonl.{dead}@{me}.3.tmp"),   // dead writer here: stale
            format!(".metrics.jsonl.{mine}@{me}.4.tmp"),   // this process: kept
            format!(".model.safetensors.{dead}@elsewhere.0.tmp"), // another host, recent: kept
            ".hidden.tmp".to_string(),                     // not ours: kept
            "notes.tmp".to_string(),                       // not ours: kept
        ];
        for n in &names {
            fs::write(dir.join(n), b"partial").unwrap();
        }
        assert_eq!(remove_stale_temporaries(&dir).unwrap(), 2);
        let mut left = temporaries(&dir);
        left.sort();
        let mut kept: Vec<String> = names[2..].to_vec();
        kept.sort();
        assert_eq!(left, kept);
        // Writing a file removes its own stale temporaries.
        fs::write(dir.join(format!(".eval.json.{dead}@{me}.0.tmp")), b"x").unwrap();
        write_atomically(&dir.join("eval.json"), b"{}").unwrap();
        assert!(!temporaries(&dir)
            .iter()
            .any(|n| n.starts_with(".eval.json")));
        assert_eq!(remove_stale_temporaries(&dir.join("absent")).unwrap(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn temporary_names_parse() {
        let t = Temporary::parse(".checkpoint.safetensors.123@node-1.7.tmp").unwrap();
        assert_eq!(t.target, "checkpoint.safetensors");
        assert_eq!(t.pid, 123);
        assert_eq!(t.host.as_deref(), Some("node-1"));
        let old = Temporary::parse(".checkpoint.safetensors.4242.tmp").unwrap();
        assert_eq!(
            (old.target.as_str(), old.pid, old.host),
            ("checkpoint.safetensors", 4242, None)
        );
        for bad in [
            ".tmp",
            "..tmp",
            ".a.tmp",
            "a.1.tmp",
            ".a.x.tmp",
            ".a.1@h.x.tmp",
        ] {
            assert_eq!(Temporary::parse(bad), None, "{bad}");
        }
        assert_eq!(
            fault::parse("kill:3:100:checkpoint.safetensors"),
            Some(fault::Fault {
                file_name: Some("checkpoint.safetensors".into()),
                skip: 3,
                step: fault::Step::Write { after_bytes: 100 },
                action: fault::Action::Kill,
            })
        );
        assert_eq!(
            fault::parse("fail:0:rename").unwrap().step,
            fault::Step::Rename
        );
        assert_eq!(fault::parse("explode:0:1"), None);
    }
}
