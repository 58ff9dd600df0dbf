//! `eio verify PATH`: what in a file or folder tree is complete, what is partial (resumable)
//! and what is corrupt.
//!
//! A folder is walked recursively (in name order) and each part is classified:
//! * a **run folder** (holding `checkpoint.safetensors`, `model.safetensors` or
//!   `metrics.jsonl`): *complete* when `model.safetensors` is present and valid, *partial* when
//!   only the checkpoint (or nothing yet) is there, *corrupt* when any of its files fails;
//! * a **black-box suite folder** (holding `manifest.json`): *complete* when every job file of
//!   the manifest is present and intact, *partial* when some are missing, *corrupt* when the
//!   manifest, the clean images or any job file fails;
//! * any other file by its kind: `*.safetensors` (parsed, its checksum verified when it has
//!   one, and read in full as a checkpoint when it carries eio metadata), `metrics.jsonl`
//!   (every line a record; a torn last line is *partial*: `--resume` repairs it), other
//!   `*.jsonl` (every line JSON), `*.json` (parses), `*.toml` (parses), temporary files of
//!   [`crate::safe_write`] (*stale* when their writer is gone: the next run removes them).
//!   Other files (`*.csv`, `*.md`, plots, locks) are counted, not checked.
//!
//! A checksum that is absent (files written before eio stored one) is reported as "no
//! checksum (not verified)", never as corrupt.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Device;

use crate::blackbox::Suite;
use crate::checkpoint::{Checkpoint, Phase};
use crate::experiment::{check_metrics, RunDir};
use crate::integrity::{self, Seal};
use crate::safe_write::{is_stale, Temporary};

/// The verdict on one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// A file that checks out.
    Ok,
    /// A run or suite folder with everything it should hold.
    Complete,
    /// A run or suite folder not finished yet (resumable), or a repairable file.
    Partial,
    /// A temporary file whose writer is gone (removed by the next run of its folder).
    Stale,
    /// Damaged: fails its checksum, does not parse, or holds the wrong thing.
    Corrupt,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Ok => "ok",
            Status::Complete => "complete",
            Status::Partial => "partial",
            Status::Stale => "stale",
            Status::Corrupt => "CORRUPT",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub status: Status,
    pub path: PathBuf,
    pub detail: String,
}

/// Everything [`verify`] found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    pub items: Vec<Item>,
    /// Files present but not checked (CSV, Markdown, plots, locks, ...).
    pub unchecked: usize,
}

impl Report {
    /// Items with `status`.
    pub fn count(&self, status: Status) -> usize {
        self.items.iter().filter(|i| i.status == status).count()
    }

    /// Whether anything is corrupt (what `eio verify` exits non-zero for).
    pub fn has_corrupt(&self) -> bool {
        self.count(Status::Corrupt) > 0
    }

    /// One line per item, then a summary line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            out.push_str(&format!(
                "{:<9} {}: {}\n",
                i.status.to_string(),
                i.path.display(),
                i.detail
            ));
        }
        out.push_str(&format!(
            "{} complete, {} partial, {} corrupt, {} files ok, {} stale temporary files; {} other files not checked\n",
            self.count(Status::Complete),
            self.count(Status::Partial),
            self.count(Status::Corrupt),
            self.count(Status::Ok),
            self.count(Status::Stale),
            self.unchecked
        ));
        out
    }

    fn push(&mut self, status: Status, path: &Path, detail: impl Into<String>) {
        self.items.push(Item {
            status,
            path: path.to_path_buf(),
            detail: detail.into(),
        });
    }
}

/// Errors of [`verify`] itself (a damaged file is a [`Status::Corrupt`] item, not an error).
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Verifies the file or folder tree at `path`.
///
/// # Errors
/// [`VerifyError::Read`] when `path` (or a folder inside it) cannot be read.
pub fn verify(path: &Path) -> Result<Report, VerifyError> {
    let mut report = Report::default();
    let meta = fs::metadata(path).map_err(|source| VerifyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    if meta.is_dir() {
        visit_folder(path, &mut report)?;
    } else {
        check_file(path, &mut report);
    }
    Ok(report)
}

fn entries(folder: &Path) -> Result<Vec<PathBuf>, VerifyError> {
    let read = |source| VerifyError::Read {
        path: folder.to_path_buf(),
        source,
    };
    let mut out: Vec<PathBuf> = fs::read_dir(folder)
        .map_err(read)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(read)?;
    out.sort();
    Ok(out)
}

fn visit_folder(folder: &Path, report: &mut Report) -> Result<(), VerifyError> {
    if folder.join("manifest.json").is_file() {
        return check_suite(folder, report);
    }
    let run = [
        "checkpoint.safetensors",
        "model.safetensors",
        "metrics.jsonl",
    ]
    .iter()
    .any(|f| folder.join(f).is_file());
    if run {
        check_run(folder, report)?;
    }
    for entry in entries(folder)? {
        if entry.is_dir() {
            visit_folder(&entry, report)?;
        } else if !run {
            check_file(&entry, report);
        }
    }
    Ok(())
}

/// What a `.safetensors` file holds, when it is intact.
enum Tensors {
    Checkpoint(Box<Checkpoint>, Seal),
    Other(Seal),
}

fn seal_text(seal: &Seal) -> &'static str {
    match seal {
        Seal::Verified(_) => "checksum verified",
        Seal::Absent => "no checksum (not verified)",
    }
}

fn read_safetensors(path: &Path) -> Result<Tensors, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    let seal = integrity::check(&bytes).map_err(|e| crate::error_chain(&e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| crate::error_chain(&e))?;
    let is_checkpoint = header
        .metadata()
        .as_ref()
        .is_some_and(|m| m.contains_key("eio"));
    if is_checkpoint {
        let c = Checkpoint::from_bytes(&bytes, path, &Device::Cpu, None)
            .map_err(|e| crate::error_chain(&e))?;
        Ok(Tensors::Checkpoint(Box::new(c), seal))
    } else {
        Ok(Tensors::Other(seal))
    }
}

fn describe(c: &Checkpoint) -> String {
    let p = &c.meta.progress;
    let members = if c.members.len() == 1 {
        String::new()
    } else {
        format!(", {} members", c.members.len())
    };
    let phase = match p.phase {
        Phase::Done => "finished".to_string(),
        phase => format!(
            "{} epoch {} batch {}",
            format!("{phase:?}").to_lowercase(),
            p.epoch,
            p.batch
        ),
    };
    format!("{:?}{members}, {phase}", c.meta.config.train.method).to_lowercase()
}

/// Checks one file by its kind; unknown kinds are counted as unchecked.
fn check_file(path: &Path, report: &mut Report) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some(t) = Temporary::parse(&name) {
        if is_stale(path) {
            report.push(
                Status::Stale,
                path,
                format!(
                    "temporary file of {} left by a killed write (removed by the next run of this folder)",
                    t.target
                ),
            );
        } else {
            report.push(
                Status::Partial,
                path,
                format!(
                    "temporary file of {} being written by a live process",
                    t.target
                ),
            );
        }
        return;
    }
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "safetensors" => match read_safetensors(path) {
            Ok(Tensors::Checkpoint(c, seal)) => report.push(
                Status::Ok,
                path,
                format!("{}; {}", describe(&c), seal_text(&seal)),
            ),
            Ok(Tensors::Other(seal)) => report.push(Status::Ok, path, seal_text(&seal)),
            Err(e) => report.push(Status::Corrupt, path, e),
        },
        "jsonl" => {
            let (status, detail) = jsonl(path, name == "metrics.jsonl");
            report.push(status, path, detail);
        }
        "json" => match fs::read(path).map_err(|e| e.to_string()).and_then(|b| {
            serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string())
        }) {
            Ok(_) => report.push(Status::Ok, path, "JSON parses"),
            Err(e) => report.push(Status::Corrupt, path, format!("not valid JSON: {e}")),
        },
        "toml" => match fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| t.parse::<toml::Table>().map_err(|e| e.to_string()))
        {
            Ok(_) => report.push(Status::Ok, path, "TOML parses"),
            Err(e) => report.push(Status::Corrupt, path, format!("not valid TOML: {e}")),
        },
        _ => report.unchecked += 1,
    }
}

/// A `.jsonl` file: every line JSON (`metrics`: every line an epoch record).
fn jsonl(path: &Path, metrics: bool) -> (Status, String) {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) => return (Status::Corrupt, format!("cannot read: {e}")),
    };
    if metrics {
        let check = check_metrics(&bytes);
        if let Some((line, e)) = check.corrupt.first() {
            return (
                Status::Corrupt,
                format!("line {line} is not a metrics record: {e}"),
            );
        }
        return match check.torn {
            Some(n) => (
                Status::Partial,
                format!(
                    "{} records and a torn last line ({n} bytes; `--resume` removes it)",
                    check.records.len()
                ),
            ),
            None => (Status::Ok, format!("{} records", check.records.len())),
        };
    }
    let text = String::from_utf8_lossy(&bytes);
    for (i, line) in text.lines().enumerate() {
        if !line.trim().is_empty() {
            if let Err(e) = serde_json::from_str::<serde_json::Value>(line) {
                return (Status::Corrupt, format!("line {} is not JSON: {e}", i + 1));
            }
        }
    }
    (Status::Ok, format!("{} lines", text.lines().count()))
}

/// A run folder: one summary item, plus an item for each file that is not ok.
fn check_run(folder: &Path, report: &mut Report) -> Result<(), VerifyError> {
    let dir = RunDir::new(folder);
    let mut files = Report::default();
    for entry in entries(folder)? {
        if entry.is_file() {
            check_file(&entry, &mut files);
        }
    }
    report.unchecked += files.unchecked;
    let corrupt = files.has_corrupt();
    let model = dir
        .model()
        .is_file()
        .then(|| read_safetensors(&dir.model()));
    let checkpoint = dir
        .checkpoint()
        .is_file()
        .then(|| read_safetensors(&dir.checkpoint()));
    let metrics = files
        .items
        .iter()
        .find(|i| i.path == dir.metrics())
        .map(|i| i.detail.clone());
    let (status, mut detail) = match (&model, &checkpoint) {
        _ if corrupt => (Status::Corrupt, "run folder with damaged files (below)".to_string()),
        (Some(Ok(Tensors::Checkpoint(c, seal))), _) => (
            Status::Complete,
            format!("finished run: model.safetensors ({}; {})", describe(c), seal_text(seal)),
        ),
        (Some(Ok(Tensors::Other(_))), _) => (
            Status::Corrupt,
            "model.safetensors has no eio metadata".to_string(),
        ),
        (_, Some(Ok(Tensors::Checkpoint(c, seal)))) => (
            Status::Partial,
            format!(
                "unfinished run, resumable with --resume: checkpoint.safetensors at {} ({}); no model.safetensors yet",
                describe(c),
                seal_text(seal)
            ),
        ),
        _ => (
            Status::Partial,
            "run folder without a checkpoint yet (a fresh start)".to_string(),
        ),
    };
    if let Some(m) = metrics {
        detail.push_str(&format!("; metrics.jsonl: {m}"));
    }
    report.push(status, folder, detail);
    report
        .items
        .extend(files.items.into_iter().filter(|i| i.status != Status::Ok));
    Ok(())
}

/// A black-box suite folder: one summary item, plus an item for each damaged file.
fn check_suite(folder: &Path, report: &mut Report) -> Result<(), VerifyError> {
    let mut stale = Report::default();
    let mut subfolders = vec![folder.to_path_buf()];
    for entry in entries(folder)? {
        if entry.is_dir() {
            subfolders.push(entry);
        }
    }
    for sub in &subfolders {
        for entry in entries(sub)? {
            let name = entry.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.as_deref().and_then(Temporary::parse).is_some() {
                check_file(&entry, &mut stale);
            }
        }
    }
    let clean = folder.join("clean.safetensors");
    if !clean.exists() && crate::blackbox::read_manifest(folder).is_ok() {
        report.push(
            Status::Partial,
            folder,
            "black-box suite: started, the clean images are not written yet; finish it with `eio blackbox generate`",
        );
        report.items.extend(stale.items);
        return Ok(());
    }
    let suite = match Suite::open(folder) {
        Ok(s) => s,
        Err(e) => {
            report.push(
                Status::Corrupt,
                folder,
                format!("black-box suite: {}", crate::error_chain(&e)),
            );
            report.items.extend(stale.items);
            return Ok(());
        }
    };
    let (mut present, mut missing, mut damaged) = (0, 0, Vec::new());
    for job in &suite.manifest.jobs {
        match suite.check_job(job) {
            Ok(true) => present += 1,
            Ok(false) => missing += 1,
            Err(e) => damaged.push((folder.join(job.file()), crate::error_chain(&e))),
        }
    }
    let total = suite.manifest.jobs.len();
    let summary = format!(
        "black-box suite: {present} of {total} job files intact, {missing} missing, {} damaged ({} surrogates, {} images)",
        damaged.len(),
        suite.manifest.surrogates.len(),
        suite.clean.len()
    );
    let status = if !damaged.is_empty() {
        Status::Corrupt
    } else if missing > 0 {
        Status::Partial
    } else {
        Status::Complete
    };
    let detail = if status == Status::Partial {
        format!("{summary}; finish it with `eio blackbox generate`")
    } else if status == Status::Corrupt {
        format!("{summary}; rerun `eio blackbox generate` to redo the damaged jobs")
    } else {
        summary
    };
    report.push(status, folder, detail);
    for (path, e) in damaged {
        report.push(Status::Corrupt, &path, e);
    }
    report.items.extend(stale.items);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_classified_by_kind_and_damage_is_named() {
        let dir = std::env::temp_dir().join(format!("eio-verify-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sweep = dir.join("runs").join("a");
        fs::create_dir_all(&sweep).unwrap();
        fs::write(
            dir.join("sweep.toml"),
            "name = \"x\"\n[grid]\nseed = [1, 2]\n",
        )
        .unwrap();
        fs::write(sweep.join("result.json"), "{\"accuracy\": 0.5}").unwrap();
        fs::write(sweep.join("eval.json"), "{\"reports\": [").unwrap();
        fs::write(sweep.join("eval.csv"), "model,attack\n").unwrap();
        fs::write(dir.join("figure.svg"), "<svg/>").unwrap();
        fs::write(
            dir.join(format!(".sweep.toml.{}.tmp", 1u32 << 30)),
            "partial",
        )
        .unwrap();
        let run = dir.join("stages").join("s");
        fs::create_dir_all(&run).unwrap();
        fs::write(run.join("metrics.jsonl"), "{\"phase\":").unwrap();
        fs::write(run.join("model.safetensors"), b"not safetensors").unwrap();

        let report = verify(&dir).unwrap();
        let status = |name: &str| {
            report
                .items
                .iter()
                .find(|i| i.path.ends_with(name))
                .map(|i| i.status)
        };
        assert_eq!(status("sweep.toml"), Some(Status::Ok));
        assert_eq!(status("runs/a/result.json"), Some(Status::Ok));
        assert_eq!(status("runs/a/eval.json"), Some(Status::Corrupt));
        assert_eq!(status("stages/s"), Some(Status::Corrupt));
        assert_eq!(status("stages/s/model.safetensors"), Some(Status::Corrupt));
        assert_eq!(status("stages/s/metrics.jsonl"), Some(Status::Partial));
        assert_eq!(
            status(&format!(".sweep.toml.{}.tmp", 1u32 << 30)),
            Some(Status::Stale)
        );
        assert_eq!(report.unchecked, 2, "eval.csv and figure.svg");
        assert!(report.has_corrupt());
        let text = report.render();
        assert!(
            text.contains("CORRUPT") && text.contains("eval.json"),
            "{text}"
        );

        // One file: its own verdict.
        let one = verify(&dir.join("sweep.toml")).unwrap();
        assert_eq!(one.items.len(), 1);
        assert!(!one.has_corrupt());
        assert!(verify(&dir.join("absent")).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
