//! Bounded VMM logs: nothing a guest prints, however long, grows a file past the cap
//! (`vmm.log_max_mib`, default 8 MiB), and one rotated file (`<name>.1`) is kept.
//!
//! - QEMU's serial console goes to a socket in the machine directory, not to a file. A
//!   keeper task per machine reads it and appends to `serial.log`, rotating at the cap.
//!   While no keeper is connected (the daemon is down) QEMU drops the output: bounded by
//!   construction, never blocking the guest for long.
//! - Files a VMM appends to itself (its stdout and stderr in `vmm.log`, opened for
//!   append; Firecracker's own files) are checked by the same keeper every second and,
//!   past the cap, copied to `<name>.1` and truncated; appends then carry on at the start.
//!
//! Reading a log back ([`tail`]) reads only its end, never the whole file.
//!
//! These files sit in directories a VMM can write. Every open, rotation and truncation
//! goes through [`crate::vmmdir`]: no link is followed, no FIFO blocks, and a name the
//! VMM replaced is removed and made anew (a warning says so), never written through.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncReadExt;

use crate::vmmdir::{Access, VmmDir, is_replaced};

/// How often appended-to files are checked against the cap.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long a keeper waits between attempts to reach a console that is not up yet.
const RECONNECT: Duration = Duration::from_millis(100);

/// The name of the rotated copy of `name`: `<name>.1`.
fn rotated_name(name: &OsStr) -> OsString {
    let mut rotated = name.to_os_string();
    rotated.push(".1");
    rotated
}

/// Opens `name` in `dir` to append; a name the VMM replaced (a link, FIFO, directory,
/// shared inode) is removed, with a warning, and a fresh file made.
pub(crate) fn open_append(dir: &VmmDir, name: &OsStr) -> io::Result<fs::File> {
    match dir.open_file(name, Access::Append) {
        Err(e) if is_replaced(&e) => {
            tracing::warn!(file = %dir.show(name).display(), error = %e, "log replaced by its VMM; made anew");
            dir.remove(name)?;
            dir.open_file(name, Access::Append)
        }
        other => other,
    }
}

/// A file appended to by this process, rotated to `<path>.1` before a write would take it
/// past `cap` bytes.
pub struct CappedFile {
    dir: VmmDir,
    name: OsString,
    file: fs::File,
    size: u64,
    cap: u64,
}

impl CappedFile {
    /// Opens (creating) `path` for appending, never following a link (see
    /// [`crate::vmmdir`]).
    pub fn open(path: &Path, cap: u64) -> io::Result<CappedFile> {
        let (dir, name) = VmmDir::parent_of(path)?;
        let file = open_append(&dir, &name)?;
        let size = file.metadata()?.len();
        Ok(CappedFile {
            dir,
            name,
            file,
            size,
            cap: cap.max(1),
        })
    }

    /// Appends `data`, rotating first when it would not fit. A single write larger than
    /// the cap keeps only its last `cap` bytes.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        let data = &data[data.len().saturating_sub(self.cap as usize)..];
        if self.size + data.len() as u64 > self.cap {
            // A rename moves names, whatever they are; the new file is made afresh.
            self.dir.rename(&self.name, rotated_name(&self.name))?;
            self.file = open_append(&self.dir, &self.name)?;
            self.size = 0;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

/// For a file another process appends to: when it is past `cap`, copies it to
/// `<path>.1` and truncates it (the writer's appends then go to the start). Returns
/// whether it rotated. A missing file is fine, and so is a missing directory (the
/// machine's, removed by a destroy while its keeper still ran). Nothing is followed: a
/// name the VMM replaced is removed (see [`crate::vmmdir`]) and reported.
pub fn rotate_if_over(path: &Path, cap: u64) -> io::Result<bool> {
    let (dir, name) = match VmmDir::parent_of(path) {
        Ok(found) => found,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let size = match dir.file_len(&name) {
        Ok(Some(size)) => size,
        Ok(None) => return Ok(false),
        Err(e) if is_replaced(&e) => {
            dir.remove(&name)?;
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    if size <= cap {
        return Ok(false);
    }
    let mut source = match dir.open_file(&name, Access::ReadWrite) {
        Err(e) if is_replaced(&e) => {
            dir.remove(&name)?;
            return Err(e);
        }
        other => other?,
    };
    // Only the last `cap` bytes are worth keeping; made under a fresh name, then renamed
    // over whatever `<name>.1` is.
    let target = rotated_name(&name);
    let mut partial = target.clone();
    partial.push(".partial");
    dir.remove(&partial)?;
    let mut copy = dir.open_file(&partial, Access::CreateNew)?;
    source.seek(SeekFrom::Start(size.saturating_sub(cap)))?;
    io::copy(&mut (&mut source).take(cap), &mut copy)?;
    dir.rename(&partial, &target)?;
    source.set_len(0)?;
    Ok(true)
}

/// The last `max` bytes of a file, lossily decoded and trimmed; empty if unreadable or
/// not a regular file (never following a link, never blocking on a FIFO). Reads only
/// those bytes.
pub fn tail(path: &Path, max: usize) -> String {
    let Ok(mut file) =
        VmmDir::parent_of(path).and_then(|(dir, name)| dir.open_file(name, Access::Read))
    else {
        return String::new();
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = size.saturating_sub(max as u64);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity(max.min(size as usize));
    let _ = file.take(max as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).trim().to_string()
}

/// What a keeper looks after for one machine.
#[derive(Debug, Clone)]
pub struct KeepSpec {
    /// The machine.
    pub machine_id: String,
    /// The console socket to drain into `serial_log`; none: the VMM writes the console
    /// to a file itself (then listed in `appended`).
    pub console: Option<(PathBuf, PathBuf)>,
    /// Files the VMM appends to itself.
    pub appended: Vec<PathBuf>,
    /// The cap, in bytes.
    pub cap: u64,
}

/// The keeper tasks of this daemon, one per machine whose VMM runs.
#[derive(Clone, Default)]
pub struct LogKeepers {
    running: Arc<Mutex<HashMap<String, tokio::task::JoinHandle<()>>>>,
}

impl LogKeepers {
    /// Starts the machine's keeper unless one runs. It ends by itself when `alive`
    /// says the VMM is gone. Idempotent; cheap when the keeper runs.
    pub fn keep(&self, spec: KeepSpec, alive: impl Fn() -> bool + Send + 'static) {
        let mut running = lock(&self.running);
        if running
            .get(&spec.machine_id)
            .is_some_and(|task| !task.is_finished())
        {
            return;
        }
        // Forget the keepers that ended, so the map holds the machines running now, not
        // every machine this daemon ever ran.
        running.retain(|_, task| !task.is_finished());
        let id = spec.machine_id.clone();
        let task = tokio::spawn(keep(spec, alive));
        running.insert(id, task);
    }

    /// How many keepers run (for tests and the node report).
    pub fn running(&self) -> usize {
        lock(&self.running)
            .values()
            .filter(|t| !t.is_finished())
            .count()
    }
}

async fn keep(spec: KeepSpec, alive: impl Fn() -> bool) {
    let mut console = None;
    let mut serial = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut check = tokio::time::interval(CHECK_EVERY);
    loop {
        if console.is_none()
            && let Some((socket, log)) = &spec.console
        {
            match crate::vmmdir::connect(socket).await {
                Ok(stream) => {
                    console = Some(stream);
                    if serial.is_none() {
                        serial = CappedFile::open(log, spec.cap)
                            .map_err(|e| {
                                tracing::warn!(machine = %spec.machine_id, error = %e, "open the serial log");
                            })
                            .ok();
                    }
                }
                Err(_) if !alive() => break,
                Err(_) => {}
            }
        }
        tokio::select! {
            read = async {
                match console.as_mut() {
                    Some(stream) => stream.read(&mut buf).await,
                    None => {
                        tokio::time::sleep(RECONNECT).await;
                        Err(io::Error::from(io::ErrorKind::NotConnected))
                    }
                }
            } => match read {
                Ok(0) | Err(_) => {
                    if console.take().is_some() && !alive() {
                        break;
                    }
                }
                Ok(n) => {
                    if let Some(file) = serial.as_mut()
                        && let Err(e) = file.write(&buf[..n])
                    {
                        tracing::warn!(machine = %spec.machine_id, error = %e, "write the serial log");
                    }
                }
            },
            _ = check.tick() => {
                for path in &spec.appended {
                    if let Err(e) = rotate_if_over(path, spec.cap) {
                        tracing::warn!(machine = %spec.machine_id, file = %path.display(), error = %e, "rotate a log");
                    }
                }
                if spec.console.is_none() && !alive() {
                    break;
                }
            }
        }
    }
    for path in &spec.appended {
        let _ = rotate_if_over(path, spec.cap);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capped_file_rotates_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("serial.log");
        let mut file = CappedFile::open(&path, 100).expect("open");
        for i in 0..50 {
            file.write(format!("line {i:03}\n").as_bytes())
                .expect("write");
        }
        let now = fs::metadata(&path).expect("log").len();
        let old = fs::metadata(path.with_file_name(rotated_name(path.file_name().expect("name"))))
            .expect("rotated")
            .len();
        assert!(now <= 100 && old <= 100, "{now} {old}");
        assert!(tail(&path, 1000).ends_with("line 049"));
        // One huge write keeps only its end.
        file.write(&[b'x'; 1000]).expect("big write");
        assert_eq!(fs::metadata(&path).expect("log").len(), 100);
    }

    #[test]
    fn an_appended_file_past_the_cap_is_copied_and_truncated() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vmm.log");
        assert!(!rotate_if_over(&path, 10).expect("missing is fine"));
        let gone = dir.path().join("destroyed").join("vmm.log");
        assert!(!rotate_if_over(&gone, 10).expect("a missing directory is fine"));
        let mut writer = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        writer.write_all(b"0123456789abcdef").expect("write");
        assert!(rotate_if_over(&path, 10).expect("rotate"));
        assert_eq!(
            fs::read(path.with_file_name(rotated_name(path.file_name().expect("name"))))
                .expect("rotated"),
            b"6789abcdef"
        );
        writer.write_all(b"next").expect("write after");
        assert_eq!(fs::read(&path).expect("log"), b"next");
    }

    #[test]
    fn tail_reads_only_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("big.log");
        fs::write(&path, [b"head ".repeat(1000), b"the end".to_vec()].concat()).expect("write");
        assert_eq!(tail(&path, 7), "the end");
        assert_eq!(tail(&dir.path().join("missing"), 7), "");
    }
}
