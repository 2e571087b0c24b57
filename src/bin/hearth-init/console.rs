//! The serial console, for the few lines worth its cost (each write costs milliseconds
//! under TCG): fatal errors and the probe's readiness line.

use std::io::Write;

/// Writes one line to the console (the init's stderr is `/dev/console`). Never fails:
/// there is nowhere else to report a failed console write.
pub fn line(text: &str) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{text}");
    let _ = err.flush();
}
