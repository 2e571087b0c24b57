//! The serial console, for the few lines worth its cost (each write costs milliseconds
//! under TCG): fatal errors and the probe's readiness line.

use std::io::Write;

/// Most characters of host-given text (a hostname, say) an error message shows.
const SHOWN_CHARS: usize = 64;

/// Writes one line to the console (the init's stderr is `/dev/console`). Never fails:
/// there is nowhere else to report a failed console write.
pub fn line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}

/// `text` bounded to `max` characters with control characters escaped, so that what
/// came from the host can neither flood nor drive the console ("…" marks a cut).
pub fn bounded(text: &str, max: usize) -> String {
    let mut out = String::new();
    for c in text.chars().take(max) {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    if text.chars().nth(max).is_some() {
        out.push('…');
    }
    out
}

/// Host-given text quoted for an error message: bounded and escaped.
pub fn shown(text: &str) -> String {
    format!("\"{}\"", bounded(text, SHOWN_CHARS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_text_is_escaped_and_cut() {
        assert_eq!(shown("web-1"), "\"web-1\"");
        assert_eq!(shown("a\x1b[2Jb\n"), "\"a\\u{1b}[2Jb\\n\"");
        let long = "x".repeat(1000);
        let s = shown(&long);
        assert_eq!(s.chars().filter(|&c| c == 'x').count(), SHOWN_CHARS);
        assert!(s.ends_with("…\""));
    }
}
