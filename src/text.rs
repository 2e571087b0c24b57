//! Text that came from somewhere untrusted (a guest's error, its console, host-given
//! names echoed back) made safe to keep and to show: bounded in length, and with control
//! characters made visible instead of acting on a terminal.

/// Most bytes of an event message; guest text inside one is bounded tighter where it is
/// read (the console tail, a guest's fatal error).
pub const MAX_EVENT_MESSAGE: usize = 4096;

/// Most bytes of a guest-reported error kept in a record.
pub const MAX_GUEST_ERROR: usize = 1024;

/// `text` cut to at most `max` bytes on a character boundary, with "…" marking a cut.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// `text` with every control character but newline and tab escaped (`\u{1b}`, `\r`), so
/// printing it cannot move the cursor, clear the screen or retitle a terminal.
pub fn printable(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() && c != '\n' && c != '\t' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

/// [`bounded`] to `max` characters' worth, then [`printable`]: one call for text that is
/// both kept and shown.
pub fn bounded_printable(text: &str, max: usize) -> String {
    printable(&bounded(text, max))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_on_a_character_boundary() {
        assert_eq!(bounded("short", 10), "short");
        let cut = bounded(&"é".repeat(100), 11);
        assert!(cut.len() <= 11, "{cut}");
        assert!(cut.ends_with('…'));
        assert_eq!(bounded("", 0), "");
    }

    #[test]
    fn control_characters_become_visible() {
        let hostile = "ok\x1b[2J\x1b]0;owned\x07\rline\nnext\tcol";
        let shown = printable(hostile);
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() && c != '\n' && c != '\t')
        );
        assert!(shown.contains("\\u{1b}[2J"), "{shown}");
        assert!(shown.contains("\\r"), "{shown}");
        assert!(shown.contains("line\nnext\tcol"), "{shown}");
    }
}

/// A message an untrusted party (a guest, a VMM, a network client) can cause as often as
/// it likes: logged at most once per interval, each time with how many were not, so the
/// log's growth is bounded by time, not by what the party sends.
#[derive(Debug)]
pub struct Throttled {
    every: std::time::Duration,
    state: std::sync::Mutex<(Option<std::time::Instant>, u64)>,
}

impl Throttled {
    /// At most one message per `every`.
    pub fn new(every: std::time::Duration) -> Throttled {
        Throttled {
            every,
            state: std::sync::Mutex::new((None, 0)),
        }
    }

    /// Whether to log this occurrence now: `Some(n)` with the `n` occurrences not logged
    /// since the last one, or none (this one is counted instead).
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = std::time::Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.every => {
                state.1 += 1;
                None
            }
            _ => {
                state.0 = Some(now);
                Some(std::mem::take(&mut state.1))
            }
        }
    }
}

#[cfg(test)]
mod throttled_tests {
    use super::Throttled;

    #[test]
    fn one_message_per_interval_with_the_count_of_the_rest() {
        let t = Throttled::new(std::time::Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(t.allow(), None);
        }
        let now = Throttled::new(std::time::Duration::ZERO);
        assert_eq!(now.allow(), Some(0));
        assert_eq!(now.allow(), Some(0));
    }
}
