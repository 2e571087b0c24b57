//! What the host is: its cores and memory, read once where they are needed (admission's
//! defaults, GetNode). Kept apart from the config, which only says what was asked for.

use crate::machine::admission::HostSize;

/// The host's size: the cores this process may run on and the memory in `/proc/meminfo`
/// (0 when it cannot be read).
pub fn size() -> HostSize {
    let cores = std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1);
    let memory_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| mem_total_mib(&text))
        .unwrap_or(0);
    HostSize { cores, memory_mib }
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
fn mem_total_mib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_mem_total() {
        let text = "MemFree:  10 kB\nMemTotal:       16384000 kB\n";
        assert_eq!(mem_total_mib(text), Some(16000));
        assert_eq!(mem_total_mib("MemTotal: lots\n"), None);
        assert_eq!(mem_total_mib(""), None);
        assert!(size().cores >= 1);
    }
}
