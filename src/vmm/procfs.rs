//! What `/proc` says about VMM processes: their identity (pid + start time + boot id),
//! whether they are zombies, and which ones carry a machine's marker.
//!
//! Why all three for identity: a pid alone is reused after the process is reaped, and a
//! start time is only unique within one boot of the host. A record that survives a daemon
//! restart (or a host reboot) is matched against all three before anything is signalled.

use std::fs;
use std::path::Path;

/// The argument QEMU is given before the marker (`-name <marker>`).
pub const MARKER_FLAG: &str = "-name";
/// The argument Firecracker and its jailer are given before the marker (`--id <marker>`).
pub const ID_MARKER_FLAG: &str = "--id";

/// This boot of the host (`/proc/sys/kernel/random/boot_id`); empty if unreadable.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// What `/proc/<pid>/stat` says that matters here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 22: start time in clock ticks since boot.
    pub start_time: u64,
    /// Field 3 is `Z` (zombie) or `X` (dead): the process has ended.
    pub ended: bool,
}

/// Reads `/proc/<pid>/stat`; none when the process does not exist.
pub fn stat(pid: i32) -> Option<ProcStat> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses a stat line. The command name (field 2) may hold spaces and parentheses, so
/// fields are counted after the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, field 22 (starttime) is index 19.
    let state = fields.next()?;
    let start_time = fields.nth(18)?.parse().ok()?;
    Some(ProcStat {
        start_time,
        ended: matches!(state, "Z" | "X"),
    })
}

/// The arguments of a process (`/proc/<pid>/cmdline`), split at NULs.
fn cmdline(proc_dir: &Path) -> Option<Vec<String>> {
    let raw = fs::read(proc_dir.join("cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Live (not zombie) processes whose command line has a marker (see [`marker_id`]), as
/// `(machine_id, pid)` sorted by start time (oldest first). For orphan scans and for
/// adopting a VMM that outlived the daemon.
pub fn find_processes(name_prefix: &str) -> Vec<(String, i32)> {
    let mut found: Vec<(u64, String, i32)> = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    for ent in rd.flatten() {
        let Some(pid) = ent.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Some(args) = cmdline(&ent.path()) else {
            continue;
        };
        let Some(id) = marker_id(&args, name_prefix) else {
            continue;
        };
        match stat(pid) {
            Some(s) if !s.ended => found.push((s.start_time, id.to_string(), pid)),
            _ => {}
        }
    }
    found.sort();
    found.into_iter().map(|(_, id, pid)| (id, pid)).collect()
}

/// The machine id in `-name <prefix><id>` or `--id <prefix><id>`, if the arguments carry
/// one.
pub fn marker_id<'a>(args: &'a [String], name_prefix: &str) -> Option<&'a str> {
    args.windows(2)
        .find(|w| (w[0] == MARKER_FLAG || w[0] == ID_MARKER_FLAG) && w[1].starts_with(name_prefix))
        .map(|w| &w[1][name_prefix.len()..])
        .filter(|id| !id.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_paren() {
        let line = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 5 6 0 0 20 0 3 0 987654 1000 200 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                start_time: 987654,
                ended: false
            })
        );
        let zombie = line.replace(") S ", ") Z ");
        assert!(parse_stat(&zombie).unwrap().ended);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let me = std::process::id() as i32;
        let s = stat(me).unwrap();
        assert!(!s.ended);
        assert!(s.start_time > 0);
        assert_eq!(boot_id().len(), 36);
    }

    #[test]
    fn marker_needs_the_flag_and_the_prefix() {
        let args: Vec<String> = ["qemu", "-name", "hearth-abc", "-m", "96"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(marker_id(&args, "hearth-"), Some("abc"));
        assert_eq!(marker_id(&args, "other-"), None);
        let no_flag: Vec<String> = ["qemu", "hearth-abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(marker_id(&no_flag, "hearth-"), None);
    }
}
